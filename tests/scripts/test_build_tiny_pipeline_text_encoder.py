"""build_tiny_pipeline.py --train-text-encoder: the unet stage trains the tiny T5 with the U-Net (every variant from
the same initial encoder), assemble ships the encoder the run trained, and a run is never resumed with the other
setting. The smoke settings of test_build_tiny_pipeline.py (--scale 0.002), on a hand-made VAE and 2 world shards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_pipeline.py"


@pytest.fixture
def script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import build_tiny_pipeline
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    yield build_tiny_pipeline
    torch.set_num_threads(threads)  # main() sets --threads


def world_work(work: Path) -> Path:
    """What the vae and data stages leave: a VAE and the 2 training shards of 16 images of --scale 0.002."""
    from dalle3_fast.data.shards import ShardWriter
    from dalle3_fast.data.world import world_sample
    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    torch.manual_seed(0)
    AutoencoderKL(vae_config("tiny")).save_pretrained(work / "vae" / "final")
    train = work / "captioners" / "data" / "train"
    train.mkdir(parents=True)
    for shard in range(2):
        with ShardWriter(train / f"{shard:06d}.tar") as w:
            for i in range(shard * 16, shard * 16 + 16):
                image, rec = world_sample(0, i, 64, 64)
                w.write(f"{i:09d}", {"png": image, "txt": rec["alt"], "json": rec})
    return work


def test_alt_only_run_trains_its_encoder_and_assemble_ships_it(tmp_path, script, capsys):
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.pipeline import Dalle3Pipeline

    work = world_work(tmp_path / "work")
    argv = ["--out", str(tmp_path / "pipe"), "--work", str(work), "--scale", "0.002", "--alt-only",
            "--unet-steps", "500", "--stages", "unet,assemble", "--train-text-encoder"]
    assert script.main(argv) == 0
    run = work / "unet_alt"
    assert json.loads((run / "build_stage.json").read_text())["set"]["task_options.train_text_encoder"] is True
    assert f"[build] text encoder: {run / 'final' / 'text_encoder'}" in capsys.readouterr().err
    trained = T5TextEncoder.from_pretrained(run / "final" / "text_encoder")
    initial = T5TextEncoder.from_pretrained(run / "text_encoder")  # what "tiny" built before training
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))
    pipe = Dalle3Pipeline.from_pretrained(tmp_path / "pipe")
    for a, b in zip(pipe.text_encoder.parameters(), trained.parameters()):
        assert torch.equal(a, b)  # the pipeline keeps its text encoder in fp32

    # the same run is neither reused nor resumed with a frozen encoder, and its export must be whole
    assert script.main(argv[:-1]) == 2
    assert "was trained with --train-text-encoder" in capsys.readouterr().err
    (run / "final" / "text_encoder" / "config.json").unlink()
    assert script.main(argv[:-1] + ["--stages", "assemble"]) == 2
    assert "trained its text encoder but" in capsys.readouterr().err


def test_every_variant_trains_its_own_copy_of_the_shared_initial_encoder(tmp_path, script, monkeypatch):
    work = world_work(tmp_path / "work")
    (work / "unet" / "text_encoder").mkdir(parents=True)
    (work / "unet" / "text_encoder" / "config.json").write_text("{}")  # the default run's initial encoder
    seen = {}
    monkeypatch.setattr(script, "_run", lambda config, out, overrides, args: seen.setdefault(out.name, overrides))
    for variant, flag in [("alt-only", ["--train-text-encoder"]), ("oracle-95", [])]:
        script.stage_unet(script.parse_args(["--out", "x", "--scale", "0.002", "--variant", variant, *flag]), work)
    assert seen["unet_alt"]["task_options.text_encoder"] == str(work / "unet" / "text_encoder")
    assert seen["unet_alt"]["task_options.train_text_encoder"] is True
    assert seen["unet_oracle95"]["task_options.text_encoder"] == str(work / "unet" / "text_encoder")
    assert "task_options.train_text_encoder" not in seen["unet_oracle95"]  # without the flag: today's settings
