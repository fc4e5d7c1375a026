"""A classical detector: reads a scene graph back from pixels.

1. Each pixel takes the nearest palette colour (object, background and text colours), or none if it
   is further than ``max_colour_distance`` from all of them (so a generated image's blur and noise
   are ignored rather than invented into objects).
2. The background is the commonest background colour along the border.
3. Objects are the 4-connected components of the foreground (object colours, plus pixels near no
   palette colour) with at least ``min_area_fraction`` of a grid cell, coloured by majority vote;
   shape from geometry (fill of the bounding box, solidity = area / convex hull,
   vertical offset of the centroid in the box, aspect), size from the box extent relative to a cell.
4. Text: pixels in the text colour (black or white, whichever is not the background); when there are
   enough, the word is read by sampling the 5x7 glyph grid of ``font`` at the scale the box height
   implies. The word's row gives its position.
Relations come from object centres with the same rule as the generator.
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


def detect(image, *, max_colour_distance: float = 90.0, min_area_fraction: float = 0.02,
           min_text_fraction: float = 0.004) -> SceneGraph:
    """Scene graph (placed objects, background, word, relations between all groups) read from pixels."""
    arr = _as_array(image).astype(np.int32)
    h, w, _ = arr.shape
    d2 = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    cls = d2.argmin(-1)
    cls[d2.min(-1) > max_colour_distance ** 2] = -1

    border = np.concatenate([cls[0], cls[-1], cls[:, 0], cls[:, -1]])
    bg_votes = np.bincount(border[border >= _N_OBJECT] - _N_OBJECT, minlength=len(BACKGROUND_COLOURS))
    background = list(BACKGROUND_COLOURS)[int(bg_votes.argmax())] if bg_votes.any() else None

    cw, ch = cell_size(w, h)
    cell = min(cw, ch)
    objects = []
    # Foreground = object colours plus pixels near no palette colour (blurred or compressed edges);
    # components are found on the foreground and coloured by majority, so a fringe of a
    # neighbouring hue never splits an object or becomes one.
    foreground = (cls >= 0) & (cls < _N_OBJECT) | (cls < 0)
    labels, n = label_components(foreground)
    min_area = min_area_fraction * cw * ch
    for k in range(1, n + 1):
        comp = labels == k
        votes = np.bincount(cls[comp & (cls >= 0)], minlength=len(_NAMES))[:_N_OBJECT]
        area = comp.sum()
        if area < min_area or votes.sum() < min_area / 2:
            continue
        ys, xs = np.nonzero(comp)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        features = shape_features(comp[y0:y1, x0:x1])
        size = "large" if max(x1 - x0, y1 - y0) / cell > LARGE_EXTENT else "small"
        colour = _NAMES[int(votes.argmax())]
        objects.append((area, SceneObject(classify_shape(features), colour, size, (x0 + x1) / 2, (y0 + y1) / 2,
                                          max(x1 - x0, y1 - y0) / 2)))
    # main subject first: groups by total area, largest first
    totals: dict = {}
    for area, o in objects:
        totals[o.key()] = totals.get(o.key(), 0) + area
    objects.sort(key=lambda ao: (-totals[ao[1].key()], ao[1].key(), ao[1].cy, ao[1].cx))

    word, word_position = _read_word(cls, background, min_text_fraction, ch)
    graph = SceneGraph(tuple(o for _, o in objects), background, word, word_position, (), w, h)
    return graph.with_relations(graph.positional_relations(*relation_margins(w, h)))


def _read_word(cls: np.ndarray, background: str | None, min_fraction: float, cell_h: float):
    h, w = cls.shape
    text_classes = [_NAMES.index(c) for c in TEXT_COLOURS if c != background]
    mask = np.isin(cls, text_classes)
    if mask.sum() < max(6, min_fraction * h * w):
        return None, None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scale = max(1.0, (y1 - y0) / font.GLYPH_H)
    n_chars = max(1, int(round((x1 - x0 + scale) / (font.ADVANCE * scale))))
    text, _ = font.read_glyphs(mask, x0, y0, scale, n_chars)
    row = min(GRID - 1, int(((y0 + y1) / 2) // cell_h))
    return text, WORD_POSITIONS[row]
