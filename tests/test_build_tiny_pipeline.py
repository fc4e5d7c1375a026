"""The documented retraining command, every stage at a sliver of its steps: it must end in a pipeline
that loads and draws, and the alt-only ablation must pair its U-Net with the text encoder it trained with."""
import subprocess
import sys
from pathlib import Path

import torch

from dalle3_fast.pipeline import Dalle3Pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_pipeline.py"


def build(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "0.002", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_all_stages_then_the_alt_only_ablation(tmp_path):
    work, pipe_dir, alt_dir = tmp_path / "work", tmp_path / "pipe", tmp_path / "alt"
    log = build("--out", str(pipe_dir), "--work", str(work))
    assert "stages vae,unet,decoder,upsampler,assemble done" in log
    pipe = Dalle3Pipeline.from_pretrained(pipe_dir)
    assert pipe.decoder is not None and pipe.upsampler is not None
    assert next(pipe.unet.parameters()).dtype == torch.float32  # stored in fp16, computed in fp32
    out = pipe("a red circle above a blue square", steps=2, seed=0)
    assert out.images[0].size == (64, 64)

    log = build("--out", str(alt_dir), "--work", str(work), "--alt-only", "--stages", "unet,assemble")
    assert "already trained" not in log  # its own U-Net run, not the DSC one
    alt = Dalle3Pipeline.from_pretrained(alt_dir)
    assert not (work / "unet_alt" / "text_encoder").exists()  # it shared the DSC run's encoder
    for a, b in zip(alt.text_encoder.parameters(), pipe.text_encoder.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(alt.unet.parameters(), pipe.unet.parameters()))


def test_alt_only_run_alone_is_assembled_with_its_own_text_encoder(tmp_path):
    from dalle3_fast.models.text_encoder import T5TextEncoder

    work = tmp_path / "work"
    build("--out", str(tmp_path / "alt"), "--work", str(work), "--alt-only", "--stages", "vae,unet,assemble")
    assert not (work / "unet").exists()
    alt = Dalle3Pipeline.from_pretrained(tmp_path / "alt")
    own = T5TextEncoder.from_pretrained(work / "unet_alt" / "text_encoder")
    for a, b in zip(alt.text_encoder.parameters(), own.parameters()):
        assert torch.equal(a, b)
