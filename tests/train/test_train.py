"""The training loop on a tiny toy task (CPU): resume equivalence, DDP, atomic checkpoints, config errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dalle3_fast.train import ConfigError, OptimizerConfig, Task, load_config, lr_at, train
from dalle3_fast.train import checkpoint as ckpt
from dalle3_fast.train.images import image_grid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class ToyTask(Task):
    """Noisy linear regression through an MLP with dropout: every source of randomness the loop must restore."""

    @dataclass
    class Options:
        width: int = 16
        dump_dir: str = ""       # each rank writes its final weights here (DDP agreement test)
        fail_at: int = -1        # the data stream raises at this micro-batch

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, self.options.width), nn.GELU(), nn.Dropout(0.1), nn.Linear(self.options.width, 2))

    def batches(self, batch_size, rank, world_size, start):
        index = start
        while True:
            if index == self.options.fail_at:
                raise ValueError(f"toy data broke at micro-batch {index}")
            g = torch.Generator().manual_seed(self.ctx.seed * 100_003 + rank * 10_007 + index)
            x = torch.randn(batch_size, 4, generator=g)
            yield {"x": x, "y": x[:, :2] * 2 - x[:, 2:] + 0.1 * torch.randn(batch_size, 2, generator=g)}
            index += 1

    def loss(self, model, batch):
        noise = 0.01 * torch.randn_like(batch["x"])  # global RNG: restored on resume
        err = model(batch["x"] + noise) - batch["y"]
        return err.pow(2).mean(), {"mae": err.abs().mean().detach()}

    def after_step(self, model, step):
        self.seen = getattr(self, "seen", torch.zeros((), dtype=torch.int64)) + 1
        if self.options.dump_dir and step == 4:
            Path(self.options.dump_dir).mkdir(parents=True, exist_ok=True)
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
            save_file({k: v.contiguous() for k, v in full.items()},
                      f"{self.options.dump_dir}/rank{self.ctx.rank}.safetensors")

    def state_dict(self):
        return {"seen": getattr(self, "seen", torch.zeros((), dtype=torch.int64))}

    def load_state_dict(self, state):
        self.seen = state["seen"]

    def sample(self, model, step):
        return torch.sigmoid(model(torch.randn(4 * 8 * 8, 4)).reshape(4, 8, 8, 2)[..., :1].permute(0, 3, 1, 2))


def config(tmp_path: Path, **overrides) -> dict:
    raw = {"task": "test_train:ToyTask", "out_dir": str(tmp_path / "run"), "steps": 6, "batch_size": 4,
           "grad_accum": 2, "grad_clip": 0.5, "ema_decay": 0.9, "log_every": 1, "ckpt_every": 3, "seed": 3,
           "optimizer": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.01}}
    raw.update(overrides)
    return raw


@pytest.fixture(autouse=True)
def importable_toy_task(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.setdefault("test_train", sys.modules[__name__])


def losses(out_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, Path(out_dir, "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_reproduces_uninterrupted_run(tmp_path, precision):
    full = load_config(raw=config(tmp_path / "a", precision=precision))
    train(full, progress=False)
    first = load_config(raw=config(tmp_path / "b", precision=precision, steps=3))
    train(first, progress=False)
    rest = load_config(raw=config(tmp_path / "b", precision=precision))
    train(rest, resume=True, progress=False)
    a, b = losses(full.out_dir), losses(rest.out_dir)
    assert [s for s, _ in b] == list(range(1, 7))
    assert a == b  # bitwise: JSON round-trips floats exactly
    last_a, last_b = (ckpt.list_checkpoints(Path(c.out_dir, "checkpoints"))[-1] for c in (full, rest))
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "task.safetensors"):
        ta, tb = load_file(last_a / name), load_file(last_b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert int(load_file(last_b / "task.safetensors")["seen"]) == 6


def test_checkpoint_is_atomic_when_save_fails(tmp_path, monkeypatch):
    cfg = load_config(raw=config(tmp_path, steps=4, ckpt_every=2))
    real, calls = ckpt._save_tensors, []

    def failing(tensors, path):
        calls.append(path.name)
        if len(calls) > 6 and path.name == "optimizer.safetensors":  # second checkpoint, after model + ema
            raise OSError("disk full (simulated)")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False)
    root = Path(cfg.out_dir, "checkpoints")
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no step 4, no temp directory
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    summary = train(cfg, resume=True, progress=False)
    assert summary["step"] == 4 and [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert [s for s, _ in losses(cfg.out_dir)] == [1, 2, 3, 4]


def test_sample_grid_and_metrics(tmp_path):
    cfg = load_config(raw=config(tmp_path, steps=2, sample_every=2, log_every=2, grad_accum=1, prefetch=0))
    summary = train(cfg, progress=False)
    png = Path(cfg.out_dir, "samples", "step_00000002.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = map(json.loads, Path(summary["metrics"]).read_text().splitlines())
    assert set(row) >= {"step", "loss", "grad_norm", "lr", "samples_per_s", "mae"} and row["step"] == 2
    assert image_grid(torch.rand(5, 3, 4, 6)).size == (3 * 8 + 2, 2 * 6 + 2)


def test_fresh_run_refuses_existing_checkpoints_and_resume_needs_one(tmp_path):
    cfg = load_config(raw=config(tmp_path, steps=1))
    with pytest.raises(ValueError, match="no checkpoint"):
        train(cfg, resume=True, progress=False)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match="toy data broke at micro-batch 3"):  # raised on the prefetch thread
        train(load_config(raw=config(tmp_path / "bad", task_options={"fail_at": 3})), progress=False)
    with pytest.raises(ValueError, match="batch_size=4"):
        train(load_config(raw=config(tmp_path, steps=2, batch_size=2)), resume=True, progress=False)


def torchrun(tmp_path: Path, parallel: str) -> Path:
    out = tmp_path / parallel
    cfg_path = tmp_path / f"{parallel}.json"
    cfg_path.write_text(json.dumps(config(out, steps=4, ckpt_every=0, parallel=parallel,
                                          task_options={"dump_dir": str(out / "w")})))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dalle3_fast.train", str(cfg_path), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_and_fsdp_on_two_cpu_processes(tmp_path):
    ddp, fsdp = torchrun(tmp_path, "ddp"), torchrun(tmp_path, "fsdp")
    w0, w1 = (load_file(ddp / "w" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP replicas stay identical
    step = Path("run", "checkpoints", "step_00000004")
    state = json.loads((ddp / step / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 4 * 4 * 2 * 2
    assert {p.name for p in (ddp / step).iterdir()} >= {"rng.rank0.safetensors", "rng.rank1.safetensors",
                                                        "model.safetensors", "optimizer.json"}
    # FSDP shards the same computation: its gathered weights, EMA and optimizer match DDP's
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(ddp / step / name), load_file(fsdp / step / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), name


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'"):
        load_config(raw=config(tmp_path, lerning_rate=1))
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.beta1'"):
        load_config(raw=config(tmp_path), overrides=["optimizer.beta1=0.8"])
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        load_config(raw=config(tmp_path), overrides=["steps=ten"])
    with pytest.raises(ConfigError, match="'precision' is 'fp8'"):
        load_config(raw=config(tmp_path, precision="fp8"))
    with pytest.raises(ConfigError, match="'task' is required"):
        load_config(raw={})
    with pytest.raises(ConfigError, match="unknown config key 'task_options.depth'"):
        train(load_config(raw=config(tmp_path, task_options={"depth": 3})), progress=False)
    with pytest.raises(ConfigError, match="known tasks"):
        train(load_config(raw=config(tmp_path, task="nope")), progress=False)
    assert load_config(raw=config(tmp_path), overrides=["optimizer.lr=0.5", "precision=bf16"]).optimizer.lr == 0.5


def test_cli_help_and_one_line_errors(tmp_path, capsys):
    from dalle3_fast.train.__main__ import main
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    helped = capsys.readouterr().out
    assert exited.value.code == 0 and all(f in helped for f in ("--set", "--resume", "--out", "--steps"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config(tmp_path, batchsize=3)))
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "'batchsize'" in err
    assert main([str(tmp_path / "nope.json")]) == 2 and "does not exist" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(config(tmp_path, steps=2)))
    assert main([str(good), "--no-progress", "--set", "optimizer.lr=0.01", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2 and Path(tmp_path, "cli", "metrics.jsonl").is_file()


def test_lr_schedule_and_optimizer_state_round_trip():
    o = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(o, s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(o, 14, 14) == pytest.approx(0.1) and lr_at(o, 9, 14) == pytest.approx(0.55)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sd = {"state": {n: opt.state[p] for n, p in model.named_parameters()},
          "param_groups": [{**opt.param_groups[0], "params": ["weight", "bias"]}]}
    tensors, meta = ckpt.flatten_optimizer_state(sd)
    json.dumps(meta)
    back = ckpt.unflatten_optimizer_state(tensors, meta)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert all(torch.equal(back["state"]["weight"][k], v) for k, v in opt.state[model.weight].items())


# -- the real tasks: one step each on tiny models and 32x32 scene-world images -----------------------------
@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    from dalle3_fast.models.latent_decoder import LatentDecoder, latent_decoder_config
    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    AutoencoderKL(vae_config("tiny")).save_pretrained(root / "vae")
    LatentDecoder(latent_decoder_config("tiny")).save_pretrained(root / "decoder")
    return root


def run_task(tmp_path: Path, task: str, options: dict, **overrides) -> dict:
    raw = {"task": task, "out_dir": str(tmp_path / task), "steps": 1, "batch_size": 2, "ckpt_every": 0, "log_every": 1,
           "sample_every": 1, "task_options": {"resolution": 32, "sample_count": 2, **options}, **overrides}
    summary = train(load_config(raw=raw), progress=False)
    assert math.isfinite(summary["loss"]) and Path(summary["checkpoint"]).is_dir()
    assert list(Path(raw["out_dir"], "samples").glob("step_*.png"))
    return summary


def test_vae_task_with_patch_gan(tmp_path):
    from dalle3_fast.models.vae import AutoencoderKL

    summary = run_task(tmp_path, "vae", {"model": "tiny", "gan_start": 1}, steps=2, sample_every=2)
    row = json.loads(Path(summary["metrics"]).read_text().splitlines()[-1])
    assert {"rec", "kl", "g_loss", "d_loss"} <= set(row)
    vae = AutoencoderKL.from_pretrained(summary["final"])
    assert vae.scaling_factor != 0.18215  # re-estimated from the latents at export


def test_vae_task_foreground_weighted_mse_and_logvar_reset(tmp_path):
    from dalle3_fast.models.vae import AutoencoderKL

    summary = run_task(tmp_path, "vae", {"model": "tiny", "recon_loss": "mse+l1", "foreground_weight": 10.0,
                                         "logvar_init": -9.0}, optimizer={"lr": 1e-6})
    vae = AutoencoderKL.from_pretrained(summary["final"])
    logvar = vae.quant_conv.bias[vae.config.latent_channels:]
    assert torch.allclose(logvar, torch.full_like(logvar, -9.0), atol=1e-3)
    with pytest.raises(ValueError, match="recon_loss"):
        run_task(tmp_path / "bad", "vae", {"model": "tiny", "recon_loss": "l2"})


def test_vae_task_model_config_overrides_the_named_config(tmp_path):
    from dalle3_fast.models.vae import AutoencoderKL

    summary = run_task(tmp_path, "vae", {"model": "tiny", "model_config": {"latent_channels": 16}})
    vae = AutoencoderKL.from_pretrained(summary["final"])
    assert vae.config.latent_channels == 16 and vae.config.block_out_channels == (32, 64, 64, 64)
    assert vae.encode(torch.zeros(1, 3, 32, 32)).mode().shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="model_config"):
        run_task(tmp_path / "bad", "vae", {"model": "tiny", "model_config": {"latent_chanels": 16}})
    with pytest.raises(ValueError, match="only latent_channels"):
        run_task(tmp_path / "dir", "vae", {"model": summary["final"], "model_config": {"layers_per_block": 2}})


def test_vae_task_widens_a_trained_vae_directory(tmp_path, tiny_parts):
    from dalle3_fast.models.vae import AutoencoderKL

    summary = run_task(tmp_path, "vae", {"model": str(tiny_parts / "vae"), "model_config": {"latent_channels": 16}},
                       optimizer={"lr": 1e-6})
    wide = AutoencoderKL.from_pretrained(summary["final"])
    assert wide.config.latent_channels == 16
    old = AutoencoderKL.from_pretrained(tiny_parts / "vae")
    torch.testing.assert_close(wide.encoder.conv_in.weight, old.encoder.conv_in.weight, rtol=0, atol=1e-4)


def test_reconstruction_loss_weights_the_foreground():
    from dalle3_fast.train.tasks.vae import foreground_weights, reconstruction_loss

    x = torch.full((1, 3, 8, 8), 1.0)
    x[:, :, 2:4, 2:4] = -1.0  # a 2x2 object on a white background
    w = foreground_weights(x, 9.0)
    assert w.sum() == 60 + 4 * 10
    recon = x.clone()
    recon[:, :, 2, 2] = 0.0  # one object pixel off by 1 in every channel
    assert reconstruction_loss(recon, x, "l1") == pytest.approx(1 / 64)
    assert reconstruction_loss(recon, x, "l1", 9.0) == pytest.approx(10 / 100)
    assert reconstruction_loss(recon, x, "mse+l1") == pytest.approx(1.1 / 64)


def test_unet_task_exports_unet_and_schedule(tmp_path, tiny_parts):
    from dalle3_fast.models.unet import UNet

    summary = run_task(tmp_path, "unet", {"vae": str(tiny_parts / "vae"), "tokenizer_scenes": 40, "sample_steps": 2,
                                          "prediction_type": "v_prediction", "min_snr_gamma": 5.0,
                                          "buckets": [[32, 32], [48, 32]]}, ema_decay=0.9)
    UNet.from_pretrained(summary["final"])
    sched = json.loads(Path(summary["final"], "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["beta_schedule"] == "scaled_linear"
    assert Path(tmp_path, "unet", "text_encoder", "config.json").is_file()


def test_unet_latent_reuse_batches_resume_mid_group(tmp_path, tiny_parts):
    from dalle3_fast.train.task import TaskContext
    from dalle3_fast.train.tasks import build_task

    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=tmp_path, precision="fp32")
    task = build_task("unet", {"resolution": 32, "latent_reuse": 3}, ctx)
    full = [b for _, b in zip(range(7), task.batches(2, 0, 1, 0))]
    assert [b["image_batch"] for b in full] == [0, 0, 0, 1, 1, 1, 2]
    assert full[0]["image"] is full[2]["image"] and not torch.equal(full[2]["image"], full[3]["image"])
    resumed = [b for _, b in zip(range(3), task.batches(2, 0, 1, 4))]
    for a, b in zip(full[4:], resumed):
        assert a["image_batch"] == b["image_batch"] and a["captions"] == b["captions"]
        assert torch.equal(a["image"], b["image"])
    summary = run_task(tmp_path / "run", "unet", {"vae": str(tiny_parts / "vae"), "tokenizer_scenes": 40,
                                                  "sample_steps": 2, "latent_reuse": 2}, steps=3, sample_every=3)
    assert math.isfinite(summary["loss"])


def test_decoder_then_distill_tasks(tmp_path, tiny_parts):
    from dalle3_fast.models.latent_decoder import LatentDecoder

    opts = {"vae": str(tiny_parts / "vae"), "sample_steps": 2}
    teacher = run_task(tmp_path, "decoder", {**opts, "model": str(tiny_parts / "decoder")})
    student = run_task(tmp_path, "decoder_distill", {**opts, "teacher": teacher["final"], "skip": 20})
    LatentDecoder.from_pretrained(student["final"])
    target = load_file(Path(student["checkpoint"]) / "task.safetensors")
    assert any(k.startswith("target.decoder_unet.") for k in target)
    with pytest.raises(ValueError, match="task_options.teacher is required"):
        run_task(tmp_path / "x", "decoder_distill", opts)


def test_decoder_task_model_config_follows_a_16_channel_vae(tmp_path):
    from dalle3_fast.models.latent_decoder import LatentDecoder
    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    AutoencoderKL(vae_config("tiny", latent_channels=16)).save_pretrained(tmp_path / "vae16")
    latents = {"latent_channels": 16, "decoder_in_channels": 19, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    summary = run_task(tmp_path, "decoder", {"vae": str(tmp_path / "vae16"), "sample_steps": 2,
                                             "model_config": latents})
    assert LatentDecoder.from_pretrained(summary["final"]).config.latent_channels == 16
    with pytest.raises(ValueError, match="model_config"):
        run_task(tmp_path / "bad", "decoder", {"vae": str(tmp_path / "vae16"), "model_config": {"latent_chanels": 16}})


def test_captioner_task_pretrain_then_finetune(tmp_path):
    from dalle3_fast.models.captioner import CoCa

    first = run_task(tmp_path, "captioner", {"tokenizer_scenes": 40, "sample_tokens": 4})
    assert "contrastive" in json.loads(Path(first["metrics"]).read_text())
    fine = run_task(tmp_path / "dsc", "captioner", {"init_from": first["final"], "caption_key": "dsc", "sample_tokens": 4})
    assert CoCa.from_pretrained(fine["final"]).tokenizer is not None


def test_caption_blending_ratios():
    import random

    from dalle3_fast.train.tasks.captions import blend_captions

    records = [{"alt": "a", "dsc": "d"}] * 20000
    got = blend_captions(records, random.Random(0), synthetic_ratio=0.95, drop=0.1)
    assert abs(got.count("d") / len(got) - 0.95 * 0.9) < 0.01 and abs(got.count("") / len(got) - 0.1) < 0.01
    assert blend_captions([{"alt": "only"}], random.Random(0), synthetic_ratio=1.0) == ["only"]
    with pytest.raises(ValueError, match="neither"):
        blend_captions([{"ssc": "x"}], random.Random(0), synthetic_ratio=0.5)
