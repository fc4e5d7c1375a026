"""Evaluation: CLIP score (100 x cosine of image and text embeddings, averaged, as the DALL-E 3 paper
defines it) and, for scene-world prompts, prompt following per attribute from the pixel detector.

    python -m dalle3_fast.eval --pipeline DIR --world-prompts 200 --seed 1 --scorer captioner:DIR --json out.json
"""
from .clip_score import ClipScorer, load_scorer
from .prompts import EvalPrompt, read_prompts, world_prompts
from .run import evaluate, format_report

__all__ = ["ClipScorer", "load_scorer", "EvalPrompt", "read_prompts", "world_prompts", "evaluate", "format_report"]
