"""Read a caption or prompt back into a scene graph.

Exact on every DSC and SSC template the generator writes: ``parse_caption(dsc(g)) == g.semantic()``.
Tolerant of what a captioner or a person writes: case, spacing, missing size or colour (left as
``None``, which ``compare`` treats as unspecified), 'grey', 'centre/center'.
"""
from __future__ import annotations

import re

from .captions import PREDICATE_PHRASES
from .graph import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPE_PLURALS, SIZES, GroupKey, SceneGraph, SceneObject,
                    canonical_relation)

_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_SINGULAR = {**{s: s for s in SHAPE_PLURALS}, **{p: s for s, p in SHAPE_PLURALS.items()}}
_SIZE = "|".join(SIZES)
_COLOUR = "|".join(OBJECT_COLOURS)
_SHAPE = "|".join(sorted(_SINGULAR, key=len, reverse=True))
_GROUP_RE = re.compile(rf"\b({'|'.join(_COUNTS)})\s+(?:({_SIZE})\s+)?(?:({_COLOUR})\s+)?({_SHAPE})\b")
_REF_RE = re.compile(rf"\bthe\s+(?:({_SIZE})\s+)?(?:({_COLOUR})\s+)?({_SHAPE})\b")
_PHRASE_TO_PRED = {ph: pred for pred, phrases in PREDICATE_PHRASES.items() for ph in phrases}
_PRED_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _PHRASE_TO_PRED), key=len, reverse=True)) + r")\b")
_BG = "|".join([*BACKGROUND_COLOURS, "grey"])
_BG_RE = re.compile(rf"\b({_BG})\s+background\b|\bbackground\s+(?:is|of)\s+(?:plain\s+|a\s+plain\s+)?({_BG})\b")
_QUOTE_RE = re.compile(r"[\"“”‘’']([A-Za-z]{1,16})[\"“”‘’']")
_WORD_POS_RE = re.compile(r"\b(top|middle|centre|center|bottom)\b")
_WORD_POS = {"top": "top", "middle": "middle", "centre": "middle", "center": "middle", "bottom": "bottom"}
_SENTENCE_RE = re.compile(r"[.;!?\n]+")


def _key(size, colour, shape) -> GroupKey:
    return GroupKey(size, colour, _SINGULAR[shape])


def parse_caption(text: str) -> SceneGraph:
    """Scene graph stated by ``text`` (no positions; relations as stated), in ``semantic()`` form."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {type(text).__name__}")
    word = word_position = None
    quoted = _QUOTE_RE.search(text)
    if quoted:
        word = quoted.group(1).upper()
    # lower-case, and blank quoted words so a written "STOP" or "STAR" is never read as a shape
    body = _QUOTE_RE.sub(" QUOTED ", text).lower().replace("quoted", "QUOTED")
    body = re.sub(r"\s+", " ", body)
    sentences = [s.strip() for s in _SENTENCE_RE.split(body) if s.strip()]

    background = None
    m = _BG_RE.search(body)
    if m:
        background = (m.group(1) or m.group(2)).replace("grey", "gray")

    groups: dict[GroupKey, int] = {}
    relations = set()
    for sentence in sentences:
        if "QUOTED" in sentence and word_position is None:
            pos = _WORD_POS_RE.search(sentence)
            word_position = _WORD_POS[pos.group(1)] if pos else None
        intros = list(_GROUP_RE.finditer(sentence))
        for g in intros:
            key = _key(g.group(2), g.group(3), g.group(4))
            groups.setdefault(key, _COUNTS[g.group(1)])
        refs = [(r.start(), _key(*r.groups())) for r in _REF_RE.finditer(sentence)]
        if len(refs) < 2:  # a prompt such as "two red circles above a blue square"
            refs = [(g.start(), _key(g.group(2), g.group(3), g.group(4))) for g in intros]
        preds = list(_PRED_RE.finditer(sentence))
        if len(refs) >= 2 and preds:
            first, second = refs[0][1], refs[1][1]
            # "To the left of the B is the A" names the object first
            subject, obj = (second, first) if preds[0].start() < refs[0][0] else (first, second)
            for p in preds:
                relations.add(canonical_relation(subject, _PHRASE_TO_PRED[p.group(1)], obj))
    objects = tuple(SceneObject(k.shape, k.colour, k.size) for k, n in groups.items() for _ in range(n))
    return SceneGraph(objects, background, word, word_position if word else None,
                      tuple(relations)).semantic()
