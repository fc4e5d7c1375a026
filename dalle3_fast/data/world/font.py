"""A 5x7 bitmap font for the words the scene world writes, drawn at an integer scale.

Our own font rather than PIL's default keeps renders identical on every Pillow build and lets the
detector read words back by sampling the same 5x7 grid.
"""
from __future__ import annotations

import numpy as np

GLYPH_W, GLYPH_H = 5, 7
ADVANCE = GLYPH_W + 1  # one blank column between glyphs

_ROWS = {
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
}
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _ROWS.items()
}


def text_mask(word: str, scale: int) -> np.ndarray:
    """Boolean (7*scale, (6*len-1)*scale) mask of ``word`` (A-Z only)."""
    word = word.upper()
    bad = sorted(set(word) - set(GLYPHS))
    if bad or not word:
        raise ValueError(f"word {word!r} must be 1+ letters A-Z (unsupported: {bad})")
    if scale < 1:
        raise ValueError(f"text scale must be >= 1, got {scale}")
    cols = []
    for i, ch in enumerate(word):
        if i:
            cols.append(np.zeros((GLYPH_H, 1), dtype=bool))
        cols.append(GLYPHS[ch])
    mask = np.concatenate(cols, axis=1)
    return np.kron(mask, np.ones((scale, scale), dtype=bool)).astype(bool)


def text_width(n_chars: int, scale: int) -> int:
    return (ADVANCE * n_chars - 1) * scale


def read_glyphs(mask: np.ndarray, x0: int, y0: int, scale: float, n_chars: int) -> tuple[str, int]:
    """Read ``n_chars`` glyphs laid out from (x0, y0) at ``scale`` by sampling cell centres.

    Returns the text and the total number of mismatched cells against the nearest glyphs.
    """
    h, w = mask.shape
    letters, errors = [], 0
    names = list(GLYPHS)
    stack = np.stack([GLYPHS[c] for c in names])
    for k in range(n_chars):
        ys = (y0 + (np.arange(GLYPH_H) + 0.5) * scale).astype(int).clip(0, h - 1)
        xs = (x0 + (k * ADVANCE + np.arange(GLYPH_W) + 0.5) * scale).astype(int).clip(0, w - 1)
        cell = mask[np.ix_(ys, xs)]
        dist = (stack != cell[None]).sum(axis=(1, 2))
        best = int(dist.argmin())
        letters.append(names[best])
        errors += int(dist[best])
    return "".join(letters), errors
