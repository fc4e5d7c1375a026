"""``python -m dalle3_fast.sample`` in a subprocess: one real generation with the embedded pipeline, and
every user error as one line on stderr with a non-zero exit (no traceback)."""
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from dalle3_fast.assets import TINY_PIPELINE

needs_assets = pytest.mark.skipif(not (TINY_PIPELINE / "model_index.json").is_file(),
                                  reason="the embedded pipeline is not built (scripts/build_tiny_pipeline.py)")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dalle3_fast.sample", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@needs_assets
def test_real_generation_two_images(tmp_path):
    out = tmp_path / "img" / "x.png"
    proc = run_cli("--prompt", "a red circle above a blue square", "--seed", "3", "--n", "2", "--steps", "4",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "seeds: 3, 4" in proc.stdout
    assert "prompt: a red circle above a blue square" in proc.stdout
    for stage in ("text encoder", "U-Net", "steps/s", "decoder", "PNG"):
        assert stage in proc.stdout
    images = [Image.open(tmp_path / "img" / f"x-{i}.png") for i in range(2)]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert images[0].tobytes() != images[1].tobytes()  # different seeds, different pictures


@pytest.mark.parametrize("args,needles", [
    (["--size", "big"], ["--size", "WIDTHxHEIGHT"]),
    (["--steps", "0"], ["--steps 0", ">= 1"]),
])
def test_argument_errors(args, needles, tmp_path):
    assert_one_line_error(run_cli("--prompt", "a star", *args, "--pipeline", str(tmp_path)), *needles)


@pytest.mark.parametrize("args,needle", [(["--n", "0"], "--n 0"), (["--out", "x.jpg"], ".png")])
def test_argument_errors_in_process(args, needle, tmp_path, capsys):
    from dalle3_fast.sample import main

    assert main(["--prompt", "a star", *args, "--pipeline", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_missing_pipeline(tmp_path):
    assert_one_line_error(run_cli("--prompt", "a star", "--pipeline", str(tmp_path / "nope")), "nope",
                          "model_index.json")


@needs_assets
def test_missing_decoder_engine(tmp_path):
    assert_one_line_error(run_cli("--prompt", "a star", "--decoder-engine", str(tmp_path / "decoder.onnx")),
                          "--decoder-engine", "no such file")


def test_corrupt_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    assert_one_line_error(run_cli("--prompt", "a star", "--pipeline", str(tmp_path)), "corrupt")


@needs_assets
def test_corrupt_weights_and_long_prompt(tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(TINY_PIPELINE, pipe)
    long_prompt = " ".join(["a red circle above a blue square"] * 80)
    proc = run_cli("--prompt", long_prompt, "--no-truncate", "--pipeline", str(pipe), "--steps", "1",
                   "--out", str(tmp_path / "a.png"))
    assert_one_line_error(proc, "longer than the limit")
    assert not (tmp_path / "a.png").exists()
    weights = pipe / json.loads((pipe / "model_index.json").read_text())["unet"] / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    assert_one_line_error(run_cli("--prompt", "a star", "--pipeline", str(pipe)), "corrupt")


def test_help_documents_truncation():
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--no-truncate" in text and "truncated with a warning" in text
