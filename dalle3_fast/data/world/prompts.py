"""Compositional prompts for evaluation, each with the scene graph it asks for.

Categories follow T2I-CompBench's split: colour (binding two colours to two shapes), shape, count,
position (left/right/above/below), text (a written word), and ``dsc`` (a full descriptive caption of
a sampled scene). The truth graph is ``parse_caption(prompt)``, so a prompt can never claim what its
graph does not hold; score an image with ``compare(detect(image), case.graph)``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .captions import PREDICATE_PHRASES, dsc
from .graph import OBJECT_COLOURS, SHAPE_PLURALS, SHAPES, SceneGraph
from .parser import parse_caption
from .scene import WORDS, sample_scene

CATEGORIES = ("colour", "shape", "count", "position", "text", "dsc")
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class PromptCase:
    category: str
    prompt: str
    graph: SceneGraph


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _two_distinct(rng: random.Random):
    c1, c2 = rng.sample(sorted(OBJECT_COLOURS), 2)
    s1, s2 = rng.sample(SHAPES, 2)
    return (c1, s1), (c2, s2)


def make_prompt(category: str, rng: random.Random, width: int = 64, height: int = 64) -> str:
    if category == "colour":
        (c1, s1), (c2, s2) = _two_distinct(rng)
        return f"{_a(c1)} {s1} and {_a(c2)} {s2}"
    if category == "shape":
        return f"{_a(rng.choice(sorted(OBJECT_COLOURS)))} {rng.choice(SHAPES)}"
    if category == "count":
        n = rng.choice(sorted(_COUNT_WORDS))
        return f"{_COUNT_WORDS[n]} {rng.choice(sorted(OBJECT_COLOURS))} {SHAPE_PLURALS[rng.choice(SHAPES)]}"
    if category == "position":
        (c1, s1), (c2, s2) = _two_distinct(rng)
        phrase = rng.choice(PREDICATE_PHRASES[rng.choice(sorted(PREDICATE_PHRASES))])
        return f"{_a(c1)} {s1} {phrase} {_a(c2)} {s2}"
    if category == "text":
        where = rng.choice(("at the top", "in the middle", "at the bottom"))
        return f'{_a(rng.choice(sorted(OBJECT_COLOURS)))} {rng.choice(SHAPES)} with the word "{rng.choice(WORDS)}" written {where}'
    if category == "dsc":
        return dsc(sample_scene(rng, width, height), rng)
    raise ValueError(f"category {category!r} is not one of {CATEGORIES}")


def prompt_cases(n_per_category: int, seed: int = 0, categories=CATEGORIES, width: int = 64,
                 height: int = 64) -> list[PromptCase]:
    """``n_per_category`` prompts per category, deterministic in ``seed``."""
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    cases = []
    for category in categories:
        rng = random.Random(f"prompts:{seed}:{category}")
        for _ in range(n_per_category):
            prompt = make_prompt(category, rng, width, height)
            cases.append(PromptCase(category, prompt, parse_caption(prompt)))
    return cases
