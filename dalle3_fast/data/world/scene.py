"""Sampling scene graphs and rendering them to RGB images at any size.

Layout: the image is a 3x3 grid of cells; each object sits inside its own cell (jittered by at most
1/8 cell, never leaving it), so objects never overlap and left/right/above/below are unambiguous. A
word, when present, takes a whole row of cells. Sizes are relative to the cell: large objects span
0.84 of a cell, small ones 0.52.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from . import font
from .graph import (BACKGROUND_COLOURS, GRID, OBJECT_COLOURS, SHAPES, SIZES, TEXT_COLOURS, WORD_POSITIONS, GroupKey,
                    Relation, SceneGraph, SceneObject, cell_size, relation_margins)

WORDS = ("CAT", "DOG", "SUN", "SKY", "OK", "YES", "NO", "STOP", "GO", "TOY", "BOX", "CAKE", "FISH", "TREE",
         "MOON", "BIRD", "HOME", "ZOO", "JAM", "LOVE", "WOW", "BUS", "KEY", "HAT")
RADIUS_FRACTION = {"small": 0.26, "large": 0.42}  # of the smaller cell side
JITTER_FRACTION = 0.125  # of the cell side, per axis
TEXT_COLOUR_ON = {"white": "black", "beige": "black", "gray": "black", "black": "white"}


def _rng(seed) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def scene_seed(seed: int, index: int) -> str:
    """The per-sample seed: sample ``index`` of a run is the same whatever the sharding or workers."""
    return f"dalle3_fast.world:{seed}:{index}"


def text_scale(width: int, height: int, n_chars: int) -> int:
    _, ch = cell_size(width, height)
    return max(1, min(int(ch // 10), int(0.9 * width // (font.ADVANCE * n_chars))))


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, int) and isinstance(height, int)) or width < 24 or height < 24:
        raise ValueError(f"image size must be integers >= 24x24, got {width}x{height}")


def sample_scene(seed, width: int = 64, height: int = 64, *, word_probability: float = 0.3,
                 max_objects: int = 4) -> SceneGraph:
    """A random scene graph with pixel positions. ``seed``: int/str or a ``random.Random``."""
    _check_size(width, height)
    if not 1 <= max_objects <= 6:
        raise ValueError(f"max_objects must be in 1..6 (the grid has 6 free cells with a word), got {max_objects}")
    rng = _rng(seed)
    background = rng.choice(sorted(BACKGROUND_COLOURS))
    word = word_position = None
    rows = list(range(GRID))
    if rng.random() < word_probability:
        word = rng.choice(WORDS)
        word_position = rng.choice(WORD_POSITIONS)
        rows.remove(WORD_POSITIONS.index(word_position))
    n = rng.choices(range(1, max_objects + 1), weights=[3, 3, 2, 2, 1, 1][:max_objects])[0]
    counts, remaining = [], n
    while remaining:
        c = 1 if rng.random() < 0.6 else rng.randint(1, remaining)
        counts.append(c)
        remaining -= c
    keys = []
    for i in range(len(counts)):
        while True:
            size = "large" if i == 0 and rng.random() < 0.75 else rng.choice(SIZES)
            key = (size, rng.choice(sorted(OBJECT_COLOURS)), rng.choice(SHAPES))
            if key not in keys:
                keys.append(key)
                break
    cells = rng.sample([(r, c) for r in rows for c in range(GRID)], n)
    cw, ch = cell_size(width, height)
    objects = []
    cell_iter = iter(cells)
    for (size, colour, shape), count in zip(keys, counts):
        radius = RADIUS_FRACTION[size] * min(cw, ch)
        for _ in range(count):
            r, c = next(cell_iter)
            jx = min(JITTER_FRACTION * cw, max(0.0, 0.5 * cw - radius - 1))
            jy = min(JITTER_FRACTION * ch, max(0.0, 0.5 * ch - radius - 1))
            cx = (c + 0.5) * cw + rng.uniform(-jx, jx)
            cy = (r + 0.5) * ch + rng.uniform(-jy, jy)
            objects.append(SceneObject(shape, colour, size, round(cx, 2), round(cy, 2), round(radius, 2)))
    graph = SceneGraph(tuple(objects), background, word, word_position, (), width, height)
    main = graph.groups()[0].key
    relations = {r for r in graph.positional_relations(*relation_margins(width, height))
                 if main in (r.subject, r.object)}
    return graph.with_relations(relations)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape in a 2r x 2r box centred at (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a = r / 3
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    if shape == "star":
        # five points; the box is 1.90r x 1.81r, so shift down to centre it vertically
        pts, dy = [], r * (1 - math.cos(math.pi / 5)) / 2
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + dy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(graph: SceneGraph) -> Image.Image:
    """Draw a placed scene graph (from ``sample_scene``) as an RGB image, no anti-aliasing."""
    if not graph.width or not graph.height or not all(o.placed for o in graph.objects):
        raise ValueError("render needs a placed scene graph (width, height and object centres), "
                         "e.g. from sample_scene; parsed captions carry no positions")
    w, h = graph.width, graph.height
    image = Image.new("RGB", (w, h), BACKGROUND_COLOURS[graph.background])
    draw = ImageDraw.Draw(image)
    for o in graph.objects:
        # pixel-centre convention: a shape spanning [cx - r, cx + r] covers round(2r) pixels
        cx, cy, r = o.cx - 0.5, o.cy - 0.5, o.radius
        fill = OBJECT_COLOURS[o.colour]
        poly = shape_polygon(o.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    if graph.word:
        scale = text_scale(w, h, len(graph.word))
        mask = font.text_mask(graph.word, scale)
        _, ch = cell_size(w, h)
        row = WORD_POSITIONS.index(graph.word_position or "middle")
        y0 = int(round((row + 0.5) * ch - mask.shape[0] / 2))
        x0 = (w - mask.shape[1]) // 2
        pixels = np.asarray(image).copy()
        pixels[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = TEXT_COLOURS[TEXT_COLOUR_ON[graph.background]]
        image = Image.fromarray(pixels)
    return image


def generate(seed, width: int = 64, height: int = 64, **kwargs) -> tuple[Image.Image, SceneGraph]:
    graph = sample_scene(seed, width, height, **kwargs)
    return render(graph), graph


def realize(graph: SceneGraph, seed=0, width: int = 64, height: int = 64, *, tries: int = 2000) -> SceneGraph:
    """A placed scene that shows what ``graph`` states (e.g. a parsed prompt): every object in its own
    cell, every stated relation true; unspecified sizes, colours, background and word row are drawn
    from ``seed``. Renders a prompt exactly as a perfect generator would (an oracle for evaluation).
    """
    _check_size(width, height)
    rng = _rng(seed)
    background = graph.background or rng.choice(sorted(BACKGROUND_COLOURS))
    word_position = (graph.word_position or rng.choice(WORD_POSITIONS)) if graph.word else None
    rows = [r for r in range(GRID) if word_position is None or r != WORD_POSITIONS.index(word_position)]
    cells = [(r, c) for r in rows for c in range(GRID)]
    fill: dict[GroupKey, GroupKey] = {}  # the same unspecified key always gets the same choices
    keys = []
    for o in graph.objects:
        k = o.key()
        if k not in fill:
            fill[k] = GroupKey(k.size or rng.choice(SIZES), k.colour or rng.choice(sorted(OBJECT_COLOURS)), k.shape)
        keys.append(fill[k])
    if len(keys) > len(cells):
        raise ValueError(f"{len(keys)} objects do not fit the {len(cells)} free cells of the layout")
    cw, ch = cell_size(width, height)
    wanted = {Relation(fill.get(r.subject, r.subject), r.predicate, fill.get(r.object, r.object))
              for r in graph.relations}
    for _ in range(tries):
        placed = []
        for (size, colour, shape), (r, c) in zip(keys, rng.sample(cells, len(keys))):
            radius = RADIUS_FRACTION[size] * min(cw, ch)
            placed.append(SceneObject(shape, colour, size, (c + 0.5) * cw, (r + 0.5) * ch, round(radius, 2)))
        scene = SceneGraph(tuple(placed), background, graph.word, word_position, (), width, height)
        if wanted <= scene.positional_relations(*relation_margins(width, height)):
            return scene.with_relations(wanted)
    raise ValueError(f"no layout of the {GRID}x{GRID} grid satisfies the relations {sorted(wanted)}; "
                     "they may contradict each other")
