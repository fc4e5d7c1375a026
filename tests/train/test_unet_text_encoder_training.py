"""Task ``unet`` with ``train_text_encoder``: the T5 encoder trains with the U-Net (optimizer, EMA, checkpoint,
resume, sampling, export). Without the option the task is what it was: the bare U-Net, its names, its loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle3_fast.io import CheckpointError, load_state_dict_strict
from dalle3_fast.models.text_encoder import T5TextEncoder
from dalle3_fast.models.unet import UNet
from dalle3_fast.train import load_config, train
from dalle3_fast.train import checkpoint as ckpt
from dalle3_fast.train.task import TaskContext
from dalle3_fast.train.tasks import build_task
from dalle3_fast.train.tasks.unet import UNetWithTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

# The seeded first loss of the task below (1 thread, this tiny VAE) measured before train_text_encoder existed.
FIRST_LOSS = 1.4122967720031738


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(vae_config("tiny")).save_pretrained(root)
    return root


def options(vae: Path, **extra) -> dict:
    return {"vae": str(vae), "resolution": 32, "tokenizer_scenes": 40, "sample_steps": 2, "sample_count": 2, **extra}


def first_loss(out: Path, vae: Path, **extra):
    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=out, precision="fp32")
    torch.manual_seed(0)
    task = build_task("unet", options(vae, **extra), ctx)
    model = task.build_model()
    batch = next(task.batches(2, 0, 1, 0))
    torch.manual_seed(1)
    loss, _ = task.loss(model.train(), batch)
    return task, model, loss


def test_the_option_off_is_todays_task_and_on_starts_from_the_same_loss(tmp_path, vae):
    task, unet, loss = first_loss(tmp_path / "off", vae)
    assert type(unet) is UNet
    assert [n for n, _ in unet.named_parameters()] == [n for n, _ in UNet("tiny").named_parameters()]
    assert not any(p.requires_grad for p in task.text_encoder.parameters())
    assert loss.item() == pytest.approx(FIRST_LOSS, rel=1e-6, abs=0)

    task, joint, joint_loss = first_loss(tmp_path / "on", vae, train_text_encoder=True)
    assert isinstance(joint, UNetWithTextEncoder) and task.text_encoder is None
    encoder_names = [n for n, _ in joint.text_encoder.named_parameters()]
    assert [n for n, _ in joint.named_parameters()] == \
        [f"unet.{n}" for n, _ in unet.named_parameters()] + [f"text_encoder.{n}" for n in encoder_names]
    assert joint.unet.training and not joint.text_encoder.training  # the encoder trains without dropout
    assert joint_loss.item() == loss.item()  # the same U-Net and encoder weights, batch and noise
    joint_loss.backward()
    assert joint.text_encoder.model.shared.weight.grad.abs().sum() > 0

    # sampling reads the module's encoder (the EMA one, when the loop swaps EMA weights in)
    before = task.sample(joint, 0)
    with torch.no_grad():
        joint.text_encoder.model.shared.weight.mul_(-1)
    assert not torch.equal(before, task.sample(joint, 0))


def run(out: Path, vae: Path, steps: int, *, resume: bool = False, **task_options) -> dict:
    raw = {"task": "unet", "out_dir": str(out), "steps": steps, "batch_size": 2, "ckpt_every": 2, "log_every": 1,
           "sample_every": 2, "ema_decay": 0.5, "seed": 0, "optimizer": {"lr": 1e-3},
           "task_options": options(vae, **task_options)}
    return train(load_config(raw=raw), resume=resume, progress=False)


def losses(summary: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, Path(summary["metrics"]).read_text().splitlines())]


def test_joint_training_moves_the_encoder_resumes_exactly_and_exports_it(tmp_path, vae):
    full = run(tmp_path / "full", vae, 4, train_text_encoder=True)
    run(tmp_path / "part", vae, 2, train_text_encoder=True)
    part = run(tmp_path / "part", vae, 4, resume=True, train_text_encoder=True)
    assert losses(full) == losses(part) and [s for s, _ in losses(part)] == [1, 2, 3, 4]
    last = [ckpt.list_checkpoints(Path(s["checkpoint"]).parent)[-1] for s in (full, part)]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = (load_file(p / name) for p in last)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    model = load_file(last[0] / "model.safetensors")
    initial = T5TextEncoder.from_pretrained(tmp_path / "full" / "text_encoder")  # what "tiny" built at the start
    prefix = "text_encoder.model."
    params = dict(initial.model.named_parameters())  # a tied weight once (the checkpoint writes it once)
    moved = [k for k, v in params.items() if not torch.equal(model[prefix + k], v)]
    assert "shared.weight" in moved and len(moved) > len(params) // 2

    # export: the U-Net where it always goes, the EMA encoder (with its tokenizer) in final/text_encoder
    final = Path(full["final"])
    ema = load_file(last[0] / "ema.safetensors")
    unet = UNet.from_pretrained(final)
    assert all(torch.equal(v, ema[f"unet.{k}"]) for k, v in unet.state_dict().items())
    exported = T5TextEncoder.from_pretrained(final / "text_encoder")
    load_state_dict_strict(initial.model, {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
    prompts = ["a red circle above a blue square", ""]
    for a, b in zip(exported.encode(prompts), initial.encode(prompts)):
        assert torch.equal(a, b)
    assert not torch.equal(exported.encode(prompts)[0], T5TextEncoder.from_pretrained(
        tmp_path / "full" / "text_encoder").encode(prompts)[0])


def test_checkpoint_names_without_the_option_and_a_mismatched_resume(tmp_path, vae):
    summary = run(tmp_path / "off", vae, 1, sample_count=1)
    names = load_file(Path(summary["checkpoint"]) / "model.safetensors").keys()
    assert set(names) == set(UNet("tiny").state_dict())
    assert not (Path(summary["final"]) / "text_encoder").exists()
    with pytest.raises(CheckpointError, match="do not fit UNetWithTextEncoder"):
        run(tmp_path / "off", vae, 2, resume=True, train_text_encoder=True)


def test_an_encoder_directory_that_cannot_be_loaded_is_one_line(tmp_path, vae):
    (tmp_path / "t5").mkdir()
    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=tmp_path / "run", precision="fp32")
    task = build_task("unet", options(vae, text_encoder=str(tmp_path / "t5"), train_text_encoder=True), ctx)
    with pytest.raises(CheckpointError, match=r"task_options.text_encoder='.*t5' cannot be loaded: .*config.json"
                                              r"' is missing") as info:
        task.build_model()
    assert "\n" not in str(info.value)
