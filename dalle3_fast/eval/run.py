"""Generate an image per prompt, then score: CLIP score and, for scene-world prompts, detector accuracy."""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from dalle3_fast.data.world import accuracy, compare, detect
from dalle3_fast.pipeline import from_pil

from .clip_score import ClipScorer
from .prompts import EvalPrompt

ATTRIBUTES = ("colour", "binding", "shape", "count", "position", "size", "background", "word", "all")


def evaluate(pipe, prompts: Sequence[EvalPrompt], *, scorer: ClipScorer | None = None, n: int = 1, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, size: str | None = None,
             batch_size: int = 16, save_images=None, progress: bool = True) -> dict:
    """Per image: the detector's verdict per attribute vs the prompt's graph and the CLIP score.

    Image ``j`` of prompt ``i`` uses seed ``seed + i * n + j``, so any batch size gives the same images.
    """
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    results, clip_scores, per_category = [], [], defaultdict(list)
    seconds = 0.0
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc="eval")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        t0 = time.perf_counter()
        out = pipe([p.prompt for _, p in chunk], size=size, steps=steps, guidance=guidance, seed=seed + start)
        seconds += time.perf_counter() - t0
        if scorer is not None:
            clip_scores.extend(scorer.score(from_pil(out.images), [p.prompt for _, p in chunk]).tolist())
        for k, ((i, p), image) in enumerate(zip(chunk, out.images)):
            if save_images is not None:
                Path(save_images).mkdir(parents=True, exist_ok=True)
                image.save(Path(save_images) / f"{start + k:05d}.png")
            if p.graph is not None:
                verdict = compare(detect(image), p.graph)
                results.append(verdict)
                per_category[p.category].append(verdict)
        bar.update(len(chunk))
        bar.set_postfix(img_s=f"{(start + len(chunk)) / max(seconds, 1e-9):.2f}")
    bar.close()
    report = {"images": len(jobs), "prompts": len(prompts), "seconds_per_image": seconds / max(len(jobs), 1),
              "world_images": len(results), "accuracy": accuracy(results) if results else {},
              "accuracy_by_category": {c: accuracy(v) for c, v in sorted(per_category.items())}}
    if scorer is not None:
        report["clip_score"] = sum(clip_scores) / len(clip_scores)
        report["scorer"] = scorer.name
    return report


def format_report(report: dict) -> str:
    lines = [f"images: {report['images']} ({report['prompts']} prompts), "
             f"{report['seconds_per_image']:.3f} s/image"]
    if "clip_score" in report:
        lines.append(f"CLIP score: {report['clip_score']:.2f}  ({report['scorer']})")
    if report["accuracy"]:
        shown = [a for a in ATTRIBUTES if a in report["accuracy"]]
        lines.append(f"prompt following over {report['world_images']} scene-world images (fraction matching):")
        lines.append("  " + "".join(f"{a:>11}" for a in ["category", *shown]))
        rows = [("all", report["accuracy"])] + list(report["accuracy_by_category"].items())
        for name, acc in rows:
            lines.append("  " + f"{name:>11}" + "".join(f"{acc[a]:>11.3f}" if a in acc else f"{'-':>11}" for a in shown))
    return "\n".join(lines)
