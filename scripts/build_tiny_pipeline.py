"""Build the embedded tiny pipeline (dalle3_fast/assets/tiny_pipeline) from nothing but the scene world.

    python scripts/build_tiny_pipeline.py --out dalle3_fast/assets/tiny_pipeline

Stages (each one's result is kept under ``--work``, so a stage that already finished is skipped
when the command is run again, e.g. to train only the alt-text-only U-Net afterwards):

1. ``vae``:        the tiny KL-f8 VAE (64x64x3 -> 8x8x4), task ``vae`` of ``python -m dalle3_fast.train`` with
                   configs/vae_tiny.json: MSE + L1 weighted towards the shapes' pixels, KL 1e-6;
2. ``unet``:       the tiny U-Net on blended captions (95 % DSC / 5 % alt-text, 10 % caption drop for
                   classifier-free guidance), task ``unet`` with configs/unet_tiny.json. The same run
                   trains a SentencePiece tokenizer on scene-world captions and builds the tiny T5 text
                   encoder: randomly initialised and frozen (the U-Net learns to read its token
                   embeddings; with a 1000-piece vocabulary and a closed caption grammar that suffices).
                   ``--alt-only`` trains this U-Net on alt-text only (synthetic ratio 0), everything
                   else equal, into its own work directory: the paper's caption ablation;
3. ``decoder``:    the tiny latent diffusion decoder (task ``decoder``), then its 2-step consistency
                   distillation (task ``decoder_distill``);
4. ``upsampler``:  the local prompt upsampler (a small T5 seq2seq with its own SentencePiece tokenizer,
                   trained on SSC -> DSC caption pairs of the world);
5. ``assemble``:   Dalle3Pipeline.save_pretrained(--out).

Deterministic: every stage is seeded (model init, data order and captions come from fixed seeds), so
the same command on the same software gives the same weights up to floating-point summation order.
The step counts default to about 80 minutes on a 2-core CPU: the VAE with both cores, then the two
U-Nets and the decoder as three one-thread processes side by side (README, "Retraining the embedded
pipeline"); scale them with ``--scale``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STAGES = ("vae", "unet", "decoder", "upsampler", "assemble")
EVAL_SIZE = "64x64"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="pipeline directory to write (model_index.json + parts)")
    p.add_argument("--work", default="runs/tiny_pipeline",
                   help="directory for the stages' training runs; finished stages found here are reused")
    p.add_argument("--alt-only", action="store_true",
                   help="train the U-Net on alt-text captions only (synthetic ratio 0) instead of the 95%% DSC blend")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in order (default: all of {','.join(STAGES)})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's step count (e.g. 0.01 for a smoke run, 3 for a better model)")
    p.add_argument("--vae-steps", type=int, default=3600, help="VAE optimizer steps (batch 16)")
    p.add_argument("--unet-steps", type=int, default=4000,
                   help="U-Net optimizer steps (batch 32; each encoded image batch serves 4 steps)")
    p.add_argument("--decoder-steps", type=int, default=500, help="latent decoder steps (batch 16)")
    p.add_argument("--distill-steps", type=int, default=20, help="consistency distillation steps (batch 16)")
    p.add_argument("--upsampler-steps", type=int, default=800, help="local upsampler steps (batch 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest on a machine whose cores are shared with other jobs")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    return p.parse_args(argv)


def _steps(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _run(config: str, out: Path, overrides: dict, seed: int) -> Path:
    """One ``python -m dalle3_fast.train`` run in this process (same code path as the CLI)."""
    from dalle3_fast.train.config import load_config
    from dalle3_fast.train.loop import train

    final = out / "final"
    if final.is_dir():
        print(f"[build] {out} already trained; reusing {final}", file=sys.stderr)
        return final
    if (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")  # an interrupted earlier attempt: start this stage over
    sets = [f"{k}={json.dumps(v)}" for k, v in {**overrides, "out_dir": str(out), "seed": seed,
                                                 "device": "cpu", "sample_every": 0, "ckpt_every": 0}.items()]
    cfg = load_config(CONFIGS / config, sets)
    t0 = time.perf_counter()
    summary = train(cfg)
    print(f"[build] {config}: {cfg.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min, "
          f"final loss {summary['loss']:.4g}", file=sys.stderr)
    return final


def stage_vae(args, work: Path) -> Path:
    """vae_config("tiny") (32/64/64/64 channels, 8x8x4 latents for 64x64 images) from scratch: MSE + 0.1 L1
    with the shapes' pixels weighted 11x against the background, and the posterior's log-variance head
    starting at std 0.01 (see the ``vae`` task). Plain L1 learns the background first and after as many
    steps draws grey blobs: hue, which is the point of these pictures, comes last."""
    return _run("vae_tiny.json", work / "vae",
                {"steps": _steps(args.vae_steps, args.scale), "batch_size": 16, "ema_decay": 0.998,
                 "task_options.model": "tiny", "task_options.recon_loss": "mse+l1",
                 "task_options.foreground_weight": 10.0, "task_options.logvar_init": -9.0,
                 "optimizer.lr": 2e-3, "optimizer.betas": [0.9, 0.99], "optimizer.warmup_steps": 50,
                 "optimizer.schedule": "cosine", "optimizer.min_lr_ratio": 0.05, "log_every": 50}, args.seed)


def unet_dir(work: Path, alt_only: bool) -> Path:
    return work / ("unet_alt" if alt_only else "unet")


# Twice the widths of unet_config "tiny": binding a colour and a shape to a place takes more than 32 channels.
UNET_OVERRIDES = dict(block_out_channels=[64, 128], norm_num_groups=16, attention_head_dim=[2, 4])


def stage_unet(args, work: Path) -> Path:
    import torch

    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.unet_config import named_config

    init = work / "unet_init"
    if not (init / "config.json").is_file():
        torch.manual_seed(args.seed)
        UNet({**named_config("tiny"), **UNET_OVERRIDES}).save_pretrained(init)
    overrides = {"steps": _steps(args.unet_steps, args.scale), "ema_decay": 0.995, "log_every": 25,
                 "task_options.model": str(init), "task_options.vae": str(work / "vae" / "final"),
                 "task_options.text_encoder": "tiny", "task_options.buckets": [[64, 64]],
                 "task_options.latent_reuse": 4,
                 "optimizer.lr": 1e-3, "optimizer.warmup_steps": 100, "optimizer.schedule": "cosine",
                 "optimizer.min_lr_ratio": 0.1}
    if args.alt_only:
        overrides["task_options.synthetic_ratio"] = 0.0
        shared = work / "unet" / "text_encoder"
        if (shared / "config.json").is_file():  # the same frozen encoder as the DSC-blend run
            overrides["task_options.text_encoder"] = str(shared)
    return _run("unet_tiny.json", unet_dir(work, args.alt_only), overrides, args.seed)


def stage_decoder(args, work: Path) -> Path:
    vae = str(work / "vae" / "final")
    teacher = _run("decoder_tiny.json", work / "decoder",
                   {"steps": _steps(args.decoder_steps, args.scale), "ema_decay": 0.99, "log_every": 25,
                    "task_options.vae": vae, "optimizer.lr": 5e-4}, args.seed)
    return _run("decoder_distill_tiny.json", work / "decoder_distill",
                {"steps": _steps(args.distill_steps, args.scale), "log_every": 25, "task_options.vae": vae,
                 "task_options.teacher": str(teacher)}, args.seed)


def stage_upsampler(args, work: Path) -> Path:
    from dalle3_fast.upsample import LocalUpsampler

    out = work / "upsampler"
    if (out / "config.json").is_file():
        print(f"[build] {out} already trained; reusing it", file=sys.stderr)
        return out
    t0 = time.perf_counter()
    upsampler = LocalUpsampler.train_on_world(steps=_steps(args.upsampler_steps, args.scale), seed=args.seed)
    upsampler.save_pretrained(out)
    print(f"[build] upsampler: {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return out


def stage_assemble(args, work: Path) -> Path:
    import torch

    from dalle3_fast.diffusion import NoiseSchedule
    from dalle3_fast.models.latent_decoder import LatentDecoder
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.vae import AutoencoderKL
    from dalle3_fast.pipeline import Dalle3Pipeline
    from dalle3_fast.upsample import LocalUpsampler

    unet_run = unet_dir(work, args.alt_only)
    sched = json.loads((unet_run / "final" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule({"squaredcos_cap_v2": "cosine"}.get(sched["beta_schedule"], sched["beta_schedule"]),
                             sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"])
    # an alt-only run started before the DSC run had built its encoder made its own: use the one it trained with
    text_encoder_dir = unet_run / "text_encoder"
    if not (text_encoder_dir / "config.json").is_file():
        text_encoder_dir = work / "unet" / "text_encoder"
    vae_dir = work / "vae" / "final"
    decoder_dir = work / "decoder_distill" / "final"
    upsampler_dir = work / "upsampler"
    pipe = Dalle3Pipeline(
        T5TextEncoder.from_pretrained(text_encoder_dir), UNet.from_pretrained(unet_run / "final"),
        AutoencoderKL.from_pretrained(vae_dir),
        decoder=LatentDecoder.from_pretrained(decoder_dir) if decoder_dir.is_dir() else None,
        upsampler=LocalUpsampler.from_pretrained(upsampler_dir) if (upsampler_dir / "config.json").is_file() else None,
        schedule=schedule, prediction_type=sched["prediction_type"],
        defaults={"size": EVAL_SIZE, "steps": 20, "guidance": 5.0, "sampler": "dpmpp_2m", "decoder": "vae"},
        sizes=["64x64"])
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    pipe.to(dtype=torch.float16).save_pretrained(out)  # half the package size; from_pretrained computes in fp32
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[build] pipeline written to {out} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages names unknown stage {unknown[0]!r}; use some of {', '.join(STAGES)}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in stages:
        globals()[f"stage_{name}"](args, work)
    print(f"[build] stages {','.join(stages)} done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
