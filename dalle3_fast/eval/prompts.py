"""Evaluation prompts: from a file (one per line) or held-out scene-world prompts, each with the scene
graph it asks for when the scene-world parser reads one out of it."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from dalle3_fast.data.world import SceneGraph, parse_caption, prompt_cases
from dalle3_fast.data.world.captions import dsc
from dalle3_fast.data.world.scene import sample_scene

WORLD_STYLES = ("dsc", "compositional")
COMPOSITIONAL = ("colour", "shape", "count", "position", "text")


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    category: str                 # "file", "dsc", or a compositional category (colour, shape, ...)
    graph: SceneGraph | None      # what the prompt asks for; None when it names no scene-world object


def _with_graph(prompt: str, category: str) -> EvalPrompt:
    graph = parse_caption(prompt)
    return EvalPrompt(prompt, category, graph if graph.objects else None)


def read_prompts(path) -> list[EvalPrompt]:
    """One prompt per non-empty line of ``path``; scene-world prompts get their parsed graph."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt; write one prompt per line")
    return [_with_graph(p, "file") for p in prompts]


def world_prompts(n: int, seed: int = 1, style: str = "dsc", width: int = 64, height: int = 64) -> list[EvalPrompt]:
    """``n`` held-out scene-world prompts.

    ``dsc``: descriptive captions of freshly sampled scenes (string-seeded streams, disjoint from the
    integer scene seeds training draws from); ``compositional``: T2I-CompBench-style prompts, ``n`` split
    evenly over colour, shape, count, position and text.
    """
    if n < 1:
        raise ValueError(f"--world-prompts {n} must be >= 1")
    if style == "dsc":
        rng = random.Random(f"eval:dsc:{seed}")
        return [_with_graph(dsc(sample_scene(rng, width, height), rng), "dsc") for _ in range(n)]
    if style == "compositional":
        per = -(-n // len(COMPOSITIONAL))
        cases = prompt_cases(per, seed, COMPOSITIONAL, width, height)
        return [EvalPrompt(c.prompt, c.category, c.graph) for c in cases][:n]
    raise ValueError(f"--world-style {style!r} is unknown; use one of {', '.join(WORLD_STYLES)}")
