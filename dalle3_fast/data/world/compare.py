"""Per-attribute agreement between a predicted scene graph (detector or parsed caption) and the truth.

Attributes (each present only when the truth specifies it):
  shape       the set of shapes is the same
  colour      the set of colours is the same
  binding     every true (colour, shape) pair is present (colour bound to the right shape)
  size        every true (size, colour, shape) group is present
  count       for every true (colour, shape), the number of such objects matches; same total
  position    every true relation holds in the prediction (stated, or from its pixel positions)
  background  same background colour
  word        same written word (None when neither has one)
  all         every attribute above holds
Sizes or colours the truth leaves unspecified (None, e.g. from a prompt like "two circles") match
anything.
"""
from __future__ import annotations

from collections import Counter

from .graph import GroupKey, SceneGraph


def _matches(true_key: GroupKey, pred_key: GroupKey) -> bool:
    return all(t is None or t == p for t, p in zip(true_key, pred_key))


def compare(predicted: SceneGraph, true: SceneGraph) -> dict[str, bool]:
    pred_keys = [o.key() for o in predicted.objects]
    true_groups = true.groups()
    out: dict[str, bool] = {}
    if true_groups:
        out["shape"] = {g.key.shape for g in true_groups} == {k.shape for k in pred_keys}
        coloured = [g for g in true_groups if g.key.colour is not None]
        if coloured:
            out["colour"] = {g.key.colour for g in coloured} == {k.colour for k in pred_keys}
            out["binding"] = all(any(k.colour == g.key.colour and k.shape == g.key.shape for k in pred_keys)
                                 for g in coloured)
        sized = [g for g in true_groups if g.key.size is not None]
        if sized:
            out["size"] = all(any(_matches(g.key, k) for k in pred_keys) for g in sized)
        true_counts = Counter()
        for g in true_groups:
            true_counts[(g.key.colour, g.key.shape)] += g.count
        out["count"] = (sum(true_counts.values()) == len(pred_keys) and all(
            sum(1 for k in pred_keys if k.shape == shape and (colour is None or k.colour == colour)) == n
            for (colour, shape), n in true_counts.items()))
    else:
        out["count"] = not pred_keys
    if true.relations:
        pred_relations = predicted.all_relations()
        out["position"] = all(any(p.predicate == r.predicate and _matches(r.subject, p.subject)
                                  and _matches(r.object, p.object) for p in pred_relations)
                              for r in true.relations)
    if true.background is not None:
        out["background"] = predicted.background == true.background
    out["word"] = (predicted.word or None) == (true.word or None)
    out["all"] = all(out.values())
    return out


def accuracy(results: list[dict[str, bool]]) -> dict[str, float]:
    """Mean of each attribute over the results that have it."""
    totals, hits = Counter(), Counter()
    for r in results:
        for k, v in r.items():
            totals[k] += 1
            hits[k] += bool(v)
    return {k: hits[k] / totals[k] for k in totals}


def relation_directions(predicted: SceneGraph, true: SceneGraph) -> tuple[int, int]:
    """(right, wrong): predicted relations whose predicate and two objects match a true relation, split
    by whether they point the same way. "position" needs every object named exactly as well; this
    isolates the spatial judgement, where 50 % right is chance."""
    right = wrong = 0
    for p in predicted.all_relations():
        for r in true.relations:
            if p.predicate != r.predicate:
                continue
            if _matches(r.subject, p.subject) and _matches(r.object, p.object):
                right += 1
            elif _matches(r.subject, p.object) and _matches(r.object, p.subject):
                wrong += 1
    return right, wrong
