"""Scene graphs: what a scene-world image contains, independent of how it was obtained.

A graph comes from the sampler (with exact pixel positions), from the detector (positions read from
pixels), or from the caption parser (no positions; only the relations a caption states). Objects that
share (size, colour, shape) form a *group*; relations are stated between groups, so
"two red circles to the left of a blue square" is one relation between two groups.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from typing import NamedTuple

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
                 "cross": "crosses", "star": "stars"}
# Object colours and background colours are disjoint so pixels segment without ambiguity.
OBJECT_COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 220, 30), "green": (40, 170, 60),
    "cyan": (30, 200, 220), "blue": (30, 70, 220), "purple": (140, 50, 190), "pink": (245, 120, 190),
    "brown": (130, 80, 40),
}
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
                      "beige": (235, 220, 180)}
TEXT_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255)}
SIZES = ("small", "large")
WORD_POSITIONS = ("top", "middle", "bottom")
# Canonical predicates; "right of" and "below" are stored as the swapped canonical relation.
LEFT_OF, ABOVE = "left of", "above"
PREDICATES = (LEFT_OF, ABOVE)
GRID = 3  # objects sit in the cells of a GRID x GRID layout


class GroupKey(NamedTuple):
    size: str
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


class Group(NamedTuple):
    key: GroupKey
    count: int


class Relation(NamedTuple):
    subject: GroupKey
    predicate: str  # LEFT_OF or ABOVE
    object: GroupKey


def canonical_relation(subject: GroupKey, predicate: str, obj: GroupKey) -> Relation:
    """Normalise any of left of/right of/above/below to the canonical (left of, above) form."""
    if predicate in (LEFT_OF, ABOVE):
        return Relation(subject, predicate, obj)
    if predicate == "right of":
        return Relation(obj, LEFT_OF, subject)
    if predicate == "below":
        return Relation(obj, ABOVE, subject)
    raise ValueError(f"predicate {predicate!r} is not one of 'left of', 'right of', 'above', 'below'")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float | None = None  # centre, pixels
    cy: float | None = None
    radius: float | None = None  # half of the larger bounding-box side, pixels

    def key(self) -> GroupKey:
        return GroupKey(self.size, self.colour, self.shape)

    @property
    def placed(self) -> bool:
        return self.cx is not None and self.cy is not None


@dataclass(frozen=True)
class SceneGraph:
    """Objects in order; objects sharing (size, colour, shape) form a group, the first group being the
    main subject. ``relations`` holds the canonical relations known without positions."""
    objects: tuple[SceneObject, ...]
    background: str | None
    word: str | None = None
    word_position: str | None = None
    relations: tuple[Relation, ...] = ()
    width: int | None = None
    height: int | None = None

    def groups(self) -> list[Group]:
        counts = Counter(o.key() for o in self.objects)
        seen: list[GroupKey] = []
        for o in self.objects:
            if o.key() not in seen:
                seen.append(o.key())
        return [Group(k, counts[k]) for k in seen]

    @property
    def main_subject(self) -> Group | None:
        groups = self.groups()
        return groups[0] if groups else None

    def semantic(self) -> "SceneGraph":
        """What a caption carries: no pixel positions or image size; the main subject (first group)
        first, the other groups sorted, so two graphs with the same content compare equal."""
        groups = self.groups()
        groups = groups[:1] + sorted(groups[1:], key=lambda g: (_none_last(g.key), g.count))
        objects = tuple(SceneObject(g.key.shape, g.key.colour, g.key.size) for g in groups for _ in range(g.count))
        return SceneGraph(objects, self.background, self.word, self.word_position,
                          tuple(sorted(set(self.relations), key=relation_sort_key)))

    def positional_relations(self, margin_x: float, margin_y: float) -> set[Relation]:
        """Every canonical relation between groups that holds for all members, from pixel centres.

        Group A is left of group B when every member of A is more than ``margin_x`` pixels left of
        every member of B (likewise above with ``margin_y``). Needs placed objects.
        """
        members: dict[GroupKey, list[SceneObject]] = {}
        for o in self.objects:
            if not o.placed:
                return set()
            members.setdefault(o.key(), []).append(o)
        keys = list(members)
        out = set()
        for a in keys:
            for b in keys:
                if a == b:
                    continue
                if min(o.cx for o in members[b]) - max(o.cx for o in members[a]) > margin_x:
                    out.add(Relation(a, LEFT_OF, b))
                if min(o.cy for o in members[b]) - max(o.cy for o in members[a]) > margin_y:
                    out.add(Relation(a, ABOVE, b))
        return out

    def all_relations(self) -> set[Relation]:
        rels = set(self.relations)
        if self.width and self.height and self.objects and all(o.placed for o in self.objects):
            rels |= self.positional_relations(*relation_margins(self.width, self.height))
        return rels

    def with_relations(self, relations) -> "SceneGraph":
        return replace(self, relations=tuple(sorted(set(relations), key=relation_sort_key)))

    def to_dict(self) -> dict:
        return {
            "width": self.width, "height": self.height, "background": self.background,
            "word": self.word, "word_position": self.word_position,
            "objects": [{k: v for k, v in (("shape", o.shape), ("colour", o.colour), ("size", o.size),
                                           ("cx", o.cx), ("cy", o.cy), ("radius", o.radius)) if v is not None}
                        for o in self.objects],
            "relations": [[list(r.subject), r.predicate, list(r.object)] for r in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SceneGraph":
        try:
            objects = tuple(SceneObject(o["shape"], o["colour"], o["size"], o.get("cx"), o.get("cy"),
                                        o.get("radius")) for o in d["objects"])
            relations = tuple(Relation(GroupKey(*s), p, GroupKey(*o)) for s, p, o in d.get("relations", []))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"scene graph dict is malformed ({exc!r}); expected SceneGraph.to_dict() output") from exc
        return cls(objects, d.get("background"), d.get("word"), d.get("word_position"), relations,
                   d.get("width"), d.get("height"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def cell_size(width: int, height: int) -> tuple[float, float]:
    return width / GRID, height / GRID


def relation_margins(width: int, height: int) -> tuple[float, float]:
    """Centres in adjacent grid cells are >= 0.75 cell apart, in the same cell <= 0.25: split at 0.5."""
    cw, ch = cell_size(width, height)
    return 0.5 * cw, 0.5 * ch


def _none_last(values) -> tuple:
    return tuple((v is None, v or "") for v in values)


def relation_sort_key(r: Relation) -> tuple:
    """Sort key that tolerates unspecified (None) sizes or colours from parsed prompts."""
    return (_none_last(r.subject), r.predicate, _none_last(r.object))
