"""Evaluation: held-out prompts, detector-based prompt following (a perfect and a blank generator bound
it), CLIP score with our captioner's towers, and the CLI's errors."""
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dalle3_fast.data.world import dsc, generate, parse_caption
from dalle3_fast.eval import EvalPrompt, evaluate, format_report, read_prompts, world_prompts
from dalle3_fast.eval.__main__ import main
from dalle3_fast.eval.clip_score import load_scorer


class LookupPipeline:
    """Stands in for Dalle3Pipeline: draws each prompt's known picture (or a blank one)."""

    def __init__(self, images: dict, blank: bool = False):
        self.images, self.blank, self.calls = images, blank, []

    def __call__(self, prompts, *, size=None, steps=None, guidance=None, seed=0):
        self.calls.append((list(prompts), seed))
        images = [Image.new("RGB", (64, 64), "white") if self.blank else self.images[p] for p in prompts]
        return SimpleNamespace(images=images, revised_prompts=list(prompts), seeds=[seed + i for i in range(len(prompts))])


def world_cases(n):
    cases, images = [], {}
    for i in range(n):
        image, graph = generate(f"test-eval:{i}")
        prompt = dsc(graph, i)
        cases.append(EvalPrompt(prompt, "dsc", parse_caption(prompt)))
        images[prompt] = image
    return cases, images


def test_world_prompts_are_deterministic_and_parsed():
    a, b = world_prompts(12, seed=3), world_prompts(12, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in world_prompts(12, seed=4)]
    assert all(p.graph is not None and p.graph.objects and p.category == "dsc" for p in a)
    comp = world_prompts(10, seed=0, style="compositional")
    assert {p.category for p in comp} == {"colour", "shape", "count", "position", "text"}
    with pytest.raises(ValueError, match="world-style"):
        world_prompts(3, style="poems")


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle above a blue square\n\na photo of a cat\n")
    prompts = read_prompts(f)
    assert [p.prompt for p in prompts] == ["a red circle above a blue square", "a photo of a cat"]
    assert prompts[0].graph is not None and prompts[1].graph is None
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        read_prompts(tmp_path / "missing.txt")


def test_perfect_generator_scores_high_blank_scores_zero():
    cases, images = world_cases(12)
    perfect = evaluate(LookupPipeline(images), cases, batch_size=5, progress=False)
    assert perfect["world_images"] == 12
    for attribute in ("shape", "colour", "count"):
        assert perfect["accuracy"][attribute] >= 0.9, perfect["accuracy"]
    blank = evaluate(LookupPipeline(images, blank=True), cases, batch_size=5, progress=False)
    assert blank["accuracy"]["shape"] == 0 and blank["accuracy"]["count"] == 0
    text = format_report(perfect)
    assert "colour" in text and "position" in text and "s/image" in text


def test_seeds_do_not_depend_on_batch_size():
    cases, images = world_cases(5)
    for batch in (1, 2, 5):
        pipe = LookupPipeline(images)
        evaluate(pipe, cases, n=2, seed=10, batch_size=batch, progress=False)
        seeds = [s + k for prompts, s in pipe.calls for k in range(len(prompts))]
        assert seeds == list(range(10, 20))


def test_clip_score_with_captioner_towers(tmp_path):
    from dalle3_fast.models.captioner import CoCa, CoCaConfig
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer

    torch.manual_seed(0)
    tokenizer = SentencePieceTokenizer.train([dsc(generate(i)[1], i) for i in range(40)], vocab_size=120)
    CoCa.from_tokenizer(tokenizer, CoCaConfig.preset("tiny", image_size=32)).save_pretrained(tmp_path / "cap")
    scorer = load_scorer(f"captioner:{tmp_path / 'cap'}")
    cases, images = world_cases(4)
    report = evaluate(LookupPipeline(images), cases, scorer=scorer, batch_size=4, progress=False)
    from dalle3_fast.pipeline import from_pil

    expected = scorer.model.clip_score(from_pil([images[c.prompt] for c in cases]), [c.prompt for c in cases])
    assert report["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert -100 <= report["clip_score"] <= 100
    with pytest.raises(ValueError, match="captioner:DIR"):
        load_scorer("clip")


def test_cli_errors(tmp_path, capsys):
    assert main(["--prompts", str(tmp_path / "none.txt"), "--pipeline", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.txt" in err[0]
    assert main(["--world-prompts", "2", "--pipeline", str(tmp_path / "nope")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_cli_report_json(tmp_path, capsys, monkeypatch):
    cases, images = world_cases(3)
    (tmp_path / "p.txt").write_text("\n".join(c.prompt for c in cases) + "\n")
    import dalle3_fast.sample as sample

    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: LookupPipeline(images))
    assert main(["--prompts", str(tmp_path / "p.txt"), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 3 and report["accuracy"]["shape"] >= 0.66
    assert "prompt following" in capsys.readouterr().out
