"""The documented retraining command, every stage at a sliver of its steps and data: it must end in a pipeline
that loads and draws, its U-Net must learn from the .dsc members our recaption job wrote (not the world's
true captions), the ablation variants must differ only in their captions, and a stopped stage must resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle3_fast.data.shards import iter_samples
from dalle3_fast.pipeline import Dalle3Pipeline

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_pipeline.py"


def build(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "0.002", *args], capture_output=True, text=True,
                          timeout=1500)  # minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def stage_settings(run: Path) -> dict:
    return json.loads((run / "build_stage.json").read_text())["set"]


def test_all_stages_then_the_alt_only_ablation(tmp_path):
    work, pipe_dir, alt_dir = tmp_path / "work", tmp_path / "pipe", tmp_path / "alt"
    log = build("--out", str(pipe_dir), "--work", str(work))
    assert "stages vae,data,captioners,recaption,unet,decoder,upsampler,assemble done" in log
    pipe = Dalle3Pipeline.from_pretrained(pipe_dir)
    assert pipe.decoder is not None and pipe.upsampler is not None
    # the U-Net and the latent decoder are built for the VAE's latent channels
    assert pipe.vae.config.latent_channels == 4 == pipe.unet.config.in_channels == pipe.unet.config.out_channels
    assert pipe.decoder.config.latent_channels == 4
    assert next(pipe.unet.parameters()).dtype == torch.float32  # stored in fp16, computed in fp32
    out = pipe("a red circle above a blue square", steps=2, seed=0)
    assert out.images[0].size == (64, 64)

    # the captioner the chain trained has the conv stem, and its captions are what the U-Net read
    captioner = json.loads((work / "captioners" / "export" / "dsc" / "config.json").read_text())
    assert captioner["image_stem"] == "conv"
    assert captioner["multimodal_layers"] == 4  # the deepened fine-tune, as shipped
    ssc_settings = json.loads((work / "captioners" / "ssc" / "final" / "config.json").read_text())
    assert ssc_settings["multimodal_layers"] == 4  # the SSC captioner is a fine-tune of the deepened one
    recaptioned = sorted((work / "recaptioned").glob("*.tar"))
    assert [p.name for p in recaptioned] == ["000000.tar", "000001.tar"]
    samples = [s for s, _ in iter_samples([str(p) for p in recaptioned])]
    assert len(samples) == 32 and all(s.text("dsc") is not None for s in samples)
    assert any(s.text("dsc") != s.json()["dsc"] for s in samples)  # not the world's true DSC
    unet = stage_settings(work / "unet")
    assert unet["task_options.data"] == str(work / "recaptioned" / "{000000..000001}.tar")
    assert unet["task_options.synthetic_member"] == "dsc" and unet["task_options.synthetic_ratio"] == 0.95

    log = build("--out", str(alt_dir), "--work", str(work), "--alt-only", "--stages", "unet,assemble")
    assert "already trained" not in log  # its own U-Net run, not the DSC one
    alt = Dalle3Pipeline.from_pretrained(alt_dir)
    assert not (work / "unet_alt" / "text_encoder").exists()  # it shared the DSC run's encoder
    for a, b in zip(alt.text_encoder.parameters(), pipe.text_encoder.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(alt.unet.parameters(), pipe.unet.parameters()))
    settings = stage_settings(work / "unet_alt")
    assert settings["task_options.data"] == str(work / "captioners" / "data" / "train" / "{000000..000001}.tar")
    assert settings["task_options.synthetic_ratio"] == 0.0
    captions = ("task_options.data", "task_options.synthetic_member", "task_options.synthetic_ratio",
                "task_options.text_encoder", "out_dir")
    assert {k: v for k, v in settings.items() if k not in captions} == \
        {k: v for k, v in unet.items() if k not in captions}  # same architecture, seed, steps


def test_alt_only_run_alone_is_assembled_with_its_own_text_encoder_and_a_stopped_stage_resumes(tmp_path):
    from dalle3_fast.models.text_encoder import T5TextEncoder

    work = tmp_path / "work"
    build("--out", str(tmp_path / "alt"), "--work", str(work), "--alt-only", "--stages", "vae,data,unet,assemble",
          "--ckpt-every", "2", "--vae-latent-channels", "16")
    assert not (work / "unet").exists() and not (work / "captioners" / "export").exists()
    alt = Dalle3Pipeline.from_pretrained(tmp_path / "alt")
    assert alt.vae.config.latent_channels == 16 == alt.unet.config.in_channels  # widened, and the U-Net follows
    own = T5TextEncoder.from_pretrained(work / "unet_alt" / "text_encoder")
    for a, b in zip(alt.text_encoder.parameters(), own.parameters()):
        assert torch.equal(a, b)

    import shutil

    from dalle3_fast.train.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(work / "vae4" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000006", "step_00000007"]
    for run in ("vae4", "vae"):
        shutil.rmtree(work / run / "final")  # as if stopped at step 6 of 7 of the first run
    shutil.rmtree(work / "vae")
    shutil.rmtree(checkpoints[-1])
    log = build("--out", str(tmp_path / "alt"), "--work", str(work), "--stages", "vae", "--ckpt-every", "2",
                "--vae-latent-channels", "16")
    assert "resuming from step_00000006" in log and (work / "vae" / "final").is_dir()
    assert "vae_tiny.json: 7 steps" in log and "vae_tiny_widen.json: 2 steps" in log
    assert json.loads((work / "vae" / "final" / "config.json").read_text())["latent_channels"] == 16


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import build_tiny_pipeline
    finally:
        sys.path.pop(0)
    return build_tiny_pipeline


@pytest.mark.parametrize("variant,source,member,ratio", [
    ("captioner-95", "recaptioned", "dsc", 0.95), ("captioner-65", "recaptioned", "dsc", 0.65),
    ("oracle-95", "world", None, 0.95), ("alt-only", "world", None, 0.0)])
def test_ablation_variants_differ_only_in_their_captions(tmp_path, variant, source, member, ratio):
    script = _script()
    args = script.parse_args(["--out", "x", "--scale", "0.002", "--variant", variant])
    work = tmp_path / "work"
    for directory in (work / "recaptioned", work / "captioners" / "data" / "train"):
        directory.mkdir(parents=True)
        for name in ("000000.tar", "000001.tar"):
            (directory / name).touch()
    data = script.unet_data(args, work)
    expected = work / ("recaptioned" if source == "recaptioned" else "captioners/data/train") / "{000000..000001}.tar"
    assert data["task_options.data"] == str(expected)
    assert data.get("task_options.synthetic_member") == member
    assert data["task_options.synthetic_ratio"] == ratio
    assert len({script.unet_dir(work, v) for v in script.VARIANTS}) == 4


def test_a_captioner_variant_without_recaptioned_shards_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "p"), "--work", str(tmp_path / "w"),
                           "--stages", "unet", "--variant", "captioner-65"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --variant captioner-65 trains on the recaptioned")
