"""A classical detector: reads a scene graph back from pixels.

1. Background: the commonest background colour (nearest palette entry) along the image border.
2. Object colours present: object palette colours with enough pixels close to the colour itself.
3. Every pixel is read as a blend of the background and one foreground colour (a present object
   colour or the text colour): the one whose background-to-colour segment passes closest to it; the
   pixel is that colour when it is more than half of it (pixels within ``core_distance`` of the
   background or a foreground colour simply take it). Blurred or compressed edges so end where the
   sharp edge was, and blends never turn into a third colour.
4. Objects: 4-connected components of each colour with at least ``min_area_fraction`` of a grid
   cell, 30 % of it close to the colour itself. Shape from geometry (fill of the bounding box,
   solidity = area / convex hull, vertical offset of the centroid), size from the box extent
   relative to a grid cell.
5. Text: the pixels of the text colour; when there are enough, the word is read by sampling the 5x7
   glyph grid of ``font`` at the scale the box height implies; its row gives its position.
Relations come from object centres with the same rule as the generator. Reliable from 48 px up
(every attribute exact on clean renders at 64 px and larger).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import font
from .graph import (BACKGROUND_COLOURS, GRID, OBJECT_COLOURS, TEXT_COLOURS, WORD_POSITIONS, SceneGraph, SceneObject,
                    cell_size, relation_margins)

_NAMES = [*OBJECT_COLOURS, *BACKGROUND_COLOURS]
_PALETTE = np.array([*OBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values()], dtype=np.int32)
_N_OBJECT = len(OBJECT_COLOURS)
LARGE_EXTENT = 0.66  # box extent / cell side: large objects span 0.80-0.84, small 0.49-0.52


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background, 1..n) by min-label propagation with pointer jumping."""
    h, w = mask.shape
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    big = h * w
    lab = np.where(mask, idx, big)
    while True:
        prev = lab
        m = lab.copy()
        m[1:, :] = np.minimum(m[1:, :], np.where(mask[1:, :] & mask[:-1, :], lab[:-1, :], big))
        m[:-1, :] = np.minimum(m[:-1, :], np.where(mask[:-1, :] & mask[1:, :], lab[1:, :], big))
        m[:, 1:] = np.minimum(m[:, 1:], np.where(mask[:, 1:] & mask[:, :-1], lab[:, :-1], big))
        m[:, :-1] = np.minimum(m[:, :-1], np.where(mask[:, :-1] & mask[:, 1:], lab[:, 1:], big))
        flat = m.ravel()
        inside = flat < big
        for _ in range(2):  # pointer jumping: follow each label to its own label
            flat[inside] = np.minimum(flat[inside], flat[flat[inside]])
        lab = flat.reshape(h, w)
        if np.array_equal(lab, prev):
            break
    roots = np.unique(lab[mask])
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


def _hull_area(points: np.ndarray) -> float:
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    x = np.array([p[0] for p in hull], dtype=float)
    y = np.array([p[1] for p in hull], dtype=float)
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def shape_features(component: np.ndarray) -> dict[str, float]:
    """Geometry of one boolean component mask cropped to its bounding box."""
    h, w = component.shape
    area = float(component.sum())
    ys, xs = np.nonzero(component)
    rows = np.unique(ys)
    left = np.array([xs[ys == r].min() for r in rows])
    right = np.array([xs[ys == r].max() + 1 for r in rows])
    corners = np.concatenate([np.stack([left, rows], 1), np.stack([left, rows + 1], 1),
                              np.stack([right, rows], 1), np.stack([right, rows + 1], 1)])
    hull = _hull_area(corners)
    return {"fill": area / (w * h), "solidity": area / hull if hull else 1.0,
            "offset_y": (ys.mean() + 0.5 - h / 2) / h, "aspect": w / h, "area": area}


def classify_shape(f: dict[str, float]) -> str:
    if f["fill"] > 0.9:
        return "square"
    if f["solidity"] < 0.66:
        return "star"
    if f["solidity"] < 0.82:
        return "cross"
    if f["fill"] > 0.66:
        return "circle"
    return "triangle" if f["offset_y"] > 0.08 else "diamond"


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or an HxWx3 uint8 array, got shape {arr.shape} {arr.dtype}")
    return arr


def detect(image, *, core_distance: float = 60.0, min_area_fraction: float = 0.02,
           min_text_fraction: float = 0.004, max_side: int = 256) -> SceneGraph:
    """Scene graph (placed objects, background, word, relations between all groups) read from pixels.

    ``image``: PIL image or HxWx3 uint8 array. ``core_distance``: RGB distance within which a pixel
    counts as an exact object colour. ``min_area_fraction``: smallest object, as a fraction of a grid
    cell. ``min_text_fraction``: fewest text pixels, as a fraction of the image, to report a word.
    Images larger than ``max_side`` are read at that size (box-filtered; everything the detector
    measures is relative to the grid) and positions are scaled back to the image's pixels.
    """
    arr = _as_array(image)
    h, w, _ = arr.shape
    if max(h, w) <= max_side:
        return _detect(arr, core_distance, min_area_fraction, min_text_fraction)
    factor = max(h, w) / max_side
    small = np.asarray(Image.fromarray(arr).resize((max(1, round(w / factor)), max(1, round(h / factor))),
                                                   Image.BOX))
    graph = _detect(small, core_distance, min_area_fraction, min_text_fraction)
    fx, fy = w / small.shape[1], h / small.shape[0]
    objects = tuple(SceneObject(o.shape, o.colour, o.size, o.cx * fx, o.cy * fy, o.radius * max(fx, fy))
                    for o in graph.objects)
    return SceneGraph(objects, graph.background, graph.word, graph.word_position, graph.relations, w, h)


def _detect(arr: np.ndarray, core_distance: float, min_area_fraction: float, min_text_fraction: float) -> SceneGraph:
    arr = arr.astype(np.int32)
    h, w, _ = arr.shape
    cw, ch = cell_size(w, h)
    cell, min_area = min(cw, ch), min_area_fraction * cw * ch
    d2 = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, palette)

    border = np.concatenate([d2[0], d2[-1], d2[:, 0], d2[:, -1]])[:, _N_OBJECT:].argmin(-1)
    bg_index = _N_OBJECT + int(np.bincount(border, minlength=len(BACKGROUND_COLOURS)).argmax())
    background = _NAMES[bg_index]

    # Object colours present: enough pixels very close to the palette colour itself. Half the core
    # distance, because a blend of two colours (yellow fading into black) can pass near a third
    # (orange) for a few pixels, and must not invent it.
    nearest = d2.argmin(-1)
    core = (nearest < _N_OBJECT) & (d2.min(-1) <= core_distance ** 2)
    pure = core & (d2.min(-1) <= (core_distance / 2) ** 2)
    present = [c for c, n in enumerate(np.bincount(nearest[pure], minlength=_N_OBJECT)) if n >= min_area / 2]
    # Every other pixel is read as a blend of the background B with one foreground colour F (a
    # present object colour, or the text colour): F is the colour whose segment B-F passes closest
    # to the pixel, and the pixel belongs to F when it is more than half F. So a blurred or
    # compressed edge ends where the sharp edge was, and a dark-yellow blend on black is yellow's
    # edge, never an orange or brown object.
    text_indices = [_NAMES.index(c) for c in TEXT_COLOURS if c != background]
    fg = np.array([*present, *text_indices])
    b = _PALETTE[bg_index].astype(np.float64)
    v = _PALETTE[fg].astype(np.float64) - b  # (K, 3)
    rel = arr.astype(np.float64) - b  # (H, W, 3)
    alpha = np.clip((rel @ v.T) / (v * v).sum(-1), 0.0, 1.0)  # (H, W, K)
    residual = ((rel[:, :, None, :] - alpha[..., None] * v) ** 2).sum(-1)
    best = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    label = np.where(best_alpha > 0.5, fg[best], bg_index)
    # pixels close to the background or a foreground colour itself are that colour, whatever the noise
    exact = (d2.min(-1) <= core_distance ** 2) & np.isin(nearest, [bg_index, *fg])
    label = np.where(exact, nearest, label)

    objects = []
    for c in present:
        components, n = label_components(label == c)
        for k in range(1, n + 1):
            comp = components == k
            area = int(comp.sum())
            # a real object has a body of its own colour; blend fragments along other edges do not
            if area < min_area or (comp & core & (nearest == c)).sum() < 0.3 * area:
                continue
            ys, xs = np.nonzero(comp)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            size = "large" if max(x1 - x0, y1 - y0) / cell > LARGE_EXTENT else "small"
            shape = classify_shape(shape_features(comp[y0:y1, x0:x1]))
            objects.append((area, SceneObject(shape, _NAMES[c], size, float(x0 + x1) / 2, float(y0 + y1) / 2,
                                              float(max(x1 - x0, y1 - y0)) / 2)))
    # main subject first: groups by total area, largest first
    totals: dict = {}
    for area, o in objects:
        totals[o.key()] = totals.get(o.key(), 0) + area
    objects.sort(key=lambda ao: (-totals[ao[1].key()], ao[1].key(), ao[1].cy, ao[1].cx))

    word, word_position = _read_word(np.isin(label, text_indices), min_text_fraction, ch)
    graph = SceneGraph(tuple(o for _, o in objects), background, word, word_position, (), w, h)
    return graph.with_relations(graph.positional_relations(*relation_margins(w, h)))


def _read_word(mask: np.ndarray, min_fraction: float, cell_h: float):
    h, w = mask.shape
    # drop isolated specks (fewer than two text neighbours) so noise cannot stretch the word's box
    padded = np.pad(mask, 1).astype(np.int8)
    neighbours = sum(padded[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    mask = mask & (neighbours >= 2)
    if mask.sum() < max(6, min_fraction * h * w):
        return None, None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scale = max(1.0, (y1 - y0) / font.GLYPH_H)
    n_chars = max(1, int(round((x1 - x0 + scale) / (font.ADVANCE * scale))))
    text, _ = font.read_glyphs(mask, x0, y0, scale, n_chars)
    row = min(GRID - 1, int(((y0 + y1) / 2) // cell_h))
    return text, WORD_POSITIONS[row]
