"""scripts/eval_captioner.py: scoring captions against held-out scene graphs, and the command itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import eval_captioner  # noqa: E402

from dalle3_fast.data.world.graph import ABOVE, LEFT_OF  # noqa: E402


def _flip(caption: str) -> str:
    """The same caption with every spatial relation pointing the other way."""
    swaps = [("left", "RIGHT"), ("right", "LEFT"), ("above", "BELOW"), ("below", "ABOVE"), ("over", "UNDER"),
             ("under", "OVER"), ("beneath", "OVER"), ("top", "BOTTOM"), ("bottom", "TOP")]
    for a, b in swaps:
        caption = caption.replace(a, b)
    return caption.lower()


def test_true_captions_score_one_and_the_direction_column_sees_flipped_relations():
    _, graphs, dscs = eval_captioner.held_out(seed=1, n=40, size=64)
    truth = eval_captioner.score_captions(dscs, graphs)
    assert truth["parse_failures"] == 0 and truth["directed_relations"] > 0
    assert all(v == 1.0 for v in truth["accuracy"].values()), truth

    with_relations = [(c, g) for c, g in zip(dscs, graphs) if g.relations and any(
        r.predicate in (LEFT_OF, ABOVE) for r in g.relations) and not g.word]
    flipped = eval_captioner.score_captions([_flip(c) for c, _ in with_relations], [g for _, g in with_relations])
    assert flipped["accuracy"]["direction"] < 0.2, flipped  # nearly every stated relation now points backwards
    assert flipped["accuracy"]["position"] < 0.2
    assert flipped["accuracy"]["shape"] == 1.0  # the objects are still named right

    table = eval_captioner.markdown_table({"truth": truth, "none": {"accuracy": {}, "parse_failures": 0.0}})
    assert "| direction |" in table and "| none | - |" in table


def test_bad_captioner_directory_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_captioner.py"), "--captioner",
                        f"x={tmp_path}", "--n", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
