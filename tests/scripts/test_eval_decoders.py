"""scripts/eval_decoders.py --vae: a bare VAE directory measured on held-out scene-world images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dalle3_fast.models.vae import AutoencoderKL, vae_config

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_decoders.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_bare_vae_directory_gets_its_decoder_row(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(vae_config("tiny", latent_channels=8)).save_pretrained(tmp_path / "vae")
    out = tmp_path / "eval.json"
    r = run("--vae", str(tmp_path / "vae"), "--size", "32x32", "--n", "3", "--batch-size", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["n"] == 3 and list(result["rows"]) == ["vae decoder"]
    row = result["rows"]["vae decoder"]
    assert row["mse"] > 0.01  # an untrained VAE reconstructs nothing
    assert set(row["detector_agreement"]) == {"shape", "colour", "count", "all"}
    assert "32x32" in r.stdout


def test_bad_size_and_teacher_without_pipeline_are_one_line_errors(tmp_path):
    AutoencoderKL(vae_config("tiny")).save_pretrained(tmp_path / "vae")
    r = run("--vae", str(tmp_path / "vae"), "--size", "64")
    assert r.returncode == 2 and "--size '64': expected WxH" in r.stderr
    r = run("--vae", str(tmp_path / "vae"), "--teacher", str(tmp_path))
    assert r.returncode == 2 and "drop --vae or --teacher" in r.stderr
