"""Build the embedded tiny pipeline (dalle3_fast/assets/tiny_pipeline) from nothing but the scene world.

    python scripts/build_tiny_pipeline.py --out dalle3_fast/assets/tiny_pipeline

Stages (each one's result is kept under ``--work``, so a stage that already finished is skipped
when the command is run again, e.g. to train only the alt-text-only U-Net afterwards):

1. ``vae``:        the tiny KL-f8 VAE (64x64x3 -> 8x8x4; half the channels of vae_config("tiny")), task
                   ``vae`` of ``python -m dalle3_fast.train`` with configs/vae_tiny.json (L1 + KL), then an
                   MSE + L1 refinement on 32x32 crops with the log-variance head reset to std 0.01 (direct
                   code: the task's L1-only loss learns the background first, and its posterior noise
                   drowns the hue of small shapes);
2. ``unet``:       the tiny U-Net on blended captions (95 % DSC / 5 % alt-text, 10 % caption drop for
                   classifier-free guidance), task ``unet`` with configs/unet_tiny.json. The same run
                   trains a SentencePiece tokenizer on scene-world captions and builds the tiny T5 text
                   encoder: randomly initialised and frozen (the U-Net learns to read its token
                   embeddings; with a 1000-piece vocabulary and a closed caption grammar that suffices).
                   ``--alt-only`` trains this U-Net on alt-text only (synthetic ratio 0), everything
                   else equal, into its own work directory: the paper's caption ablation;
   ``vae_decoder``: the VAE's decoder fine-tuned alone (MSE + L1, encoder frozen, so the U-Net's latent
                   space is unchanged); can run beside ``unet``;
3. ``decoder``:    the tiny latent diffusion decoder (task ``decoder``), then its 2-step consistency
                   distillation (task ``decoder_distill``);
4. ``upsampler``:  the local prompt upsampler (a small T5 seq2seq with its own SentencePiece tokenizer,
                   trained on SSC -> DSC caption pairs of the world);
5. ``assemble``:   Dalle3Pipeline.save_pretrained(--out).

Deterministic: every stage is seeded (model init, data order and captions come from fixed seeds), so
the same command on the same software gives the same weights up to floating-point summation order.
The step counts default to what fits about 45 minutes on a 2-core CPU shared with other jobs when the
stages run as three processes side by side (see README); scale them with ``--scale``.
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
STAGES = ("vae", "unet", "vae_decoder", "decoder", "upsampler", "assemble")
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
    p.add_argument("--vae-steps", type=int, default=300, help="VAE optimizer steps (batch 16)")
    p.add_argument("--vae-refine-steps", type=int, default=900,
                   help="VAE MSE+L1 refinement steps (batch 32 of 32x32 crops)")
    p.add_argument("--vae-decoder-steps", type=int, default=3200,
                   help="VAE decoder-only fine-tuning steps (batch 32 of 32x32 crops), encoder frozen")
    p.add_argument("--unet-steps", type=int, default=2700, help="U-Net optimizer steps (batch 32)")
    p.add_argument("--decoder-steps", type=int, default=110, help="latent decoder steps (batch 16)")
    p.add_argument("--distill-steps", type=int, default=10, help="consistency distillation steps (batch 16)")
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


# Half the channels of vae_config("tiny"): a quarter of its cost; flat-coloured shapes need no more.
VAE_CHANNELS = dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8)


def stage_vae(args, work: Path) -> Path:
    import torch

    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    init = work / "vae_init"
    if not (init / "config.json").is_file():
        torch.manual_seed(args.seed)
        AutoencoderKL(vae_config("tiny", **VAE_CHANNELS)).save_pretrained(init)
    trained = _run("vae_tiny.json", work / "vae", {"steps": _steps(args.vae_steps, args.scale), "ema_decay": 0.0,
                                                    "task_options.model": str(init),
                                                    "optimizer.lr": 1e-3, "optimizer.warmup_steps": 30,
                                                    "log_every": 25}, args.seed)
    return refine_vae(trained, work / "vae_refined", _steps(args.vae_refine_steps, args.scale),
                      start=_steps(args.vae_steps, args.scale), seed=args.seed)


CROP = 32  # refinement trains on 32x32 crops (at multiples of 8, so latent cells stay aligned): 4x the samples


def random_crop(x, generator):
    """A random CROP x CROP window of the batch ``x`` (B, 3, 64, 64), its corner on the 8-pixel latent grid."""
    import torch

    oy, ox = (int(v) * 8 for v in torch.randint(0, (64 - CROP) // 8 + 1, (2,), generator=generator))
    return x[:, :, oy:oy + CROP, ox:ox + CROP]


def refine_vae(source: Path, out: Path, steps: int, *, start: int, seed: int, batch_size: int = 32) -> Path:
    """Continue the VAE with MSE + L1 (+ 1e-6 KL) on 32x32 crops. The ``vae`` task's L1-only loss first
    learns the background (the per-pixel median) and is slow to give small flat-coloured shapes their
    colour; the squared error weighs those pixels by how wrong they are. It also leaves the posterior's
    std near 0.6 against a latent std near 1.8: sampling noise that drowns hue, so the decoder learns grey
    blobs. Resetting the log-variance head to -9 (std 0.01) first lets hue through; the 1e-6 KL keeps it
    a KL-f8 posterior. Direct code: the task has no MSE option."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from dalle3_fast.models.vae import AutoencoderKL, estimate_scaling_factor
    from dalle3_fast.train.tasks.image_data import ImageDataOptions, image_batches

    final = out / "final"
    if (final / "config.json").is_file():
        print(f"[build] {out} already trained; reusing {final}", file=sys.stderr)
        return final
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(source).train()
    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] = 0
        vae.quant_conv.bias[logvar] = -9.0
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99))
    data = image_batches(ImageDataOptions(data="world", data_seed=seed, resolution=64), batch_size, 0, 1, start)
    crops = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), unit="step", desc="vae refine", file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - 0.9 * step / steps)
        x = random_crop(next(data)["image"], crops)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample())
        mse, l1 = F.mse_loss(recon, x), (recon - x).abs().mean()
        loss = mse + 0.1 * l1 + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}", l1=f"{l1.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = vae.encode(next(image_batches(ImageDataOptions(data_seed=seed + 1), 64, 0, 1, 0))["image"]).mode()
        vae.config.scaling_factor = estimate_scaling_factor(z)
    vae.save_pretrained(final)
    print(f"[build] vae refine: {steps} steps in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return final


def stage_vae_decoder(args, work: Path) -> Path:
    """Fine-tune only the VAE's decoder (MSE + L1), the encoder and so the latent space frozen: the U-Net
    trained on these latents stays valid (as SD's ft-MSE decoder did). Runs beside the U-Net stage."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from dalle3_fast.models.vae import AutoencoderKL
    from dalle3_fast.train.tasks.image_data import ImageDataOptions, image_batches

    out = work / "vae_decoder" / "final"
    if (out / "config.json").is_file():
        print(f"[build] {out} already trained; reusing it", file=sys.stderr)
        return out
    steps = _steps(args.vae_decoder_steps, args.scale)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(work / "vae_refined" / "final")
    vae.requires_grad_(False)
    decoder = [p for name, p in vae.named_parameters() if not name.startswith(("encoder.", "quant_conv."))]
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=1e-3, betas=(0.9, 0.99))
    data = image_batches(ImageDataOptions(data="world", data_seed=args.seed + 2, resolution=64), 32, 0, 1, 0)
    crops = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), unit="step", desc="vae decoder", file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - 0.9 * step / steps)
        x = random_crop(next(data)["image"], crops)
        with torch.no_grad():
            z = vae.encode(x).sample()
        recon = vae.decode(z)
        mse, l1 = F.mse_loss(recon, x), (recon - x).abs().mean()
        (mse + 0.1 * l1).backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}", l1=f"{l1.item():.4f}")
    vae.eval().save_pretrained(out)
    print(f"[build] vae decoder: {steps} steps in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return out


def unet_dir(work: Path, alt_only: bool) -> Path:
    return work / ("unet_alt" if alt_only else "unet")


def stage_unet(args, work: Path) -> Path:
    overrides = {"steps": _steps(args.unet_steps, args.scale), "ema_decay": 0.99, "log_every": 25,
                 "task_options.vae": str(work / "vae_refined" / "final"),
                 "task_options.text_encoder": "tiny", "task_options.buckets": [[64, 64]],
                 "optimizer.lr": 1e-3, "optimizer.warmup_steps": 100, "optimizer.schedule": "cosine",
                 "optimizer.min_lr_ratio": 0.1}
    if args.alt_only:
        overrides["task_options.synthetic_ratio"] = 0.0
        shared = work / "unet" / "text_encoder"
        if (shared / "config.json").is_file():  # the same frozen encoder as the DSC-blend run
            overrides["task_options.text_encoder"] = str(shared)
    return _run("unet_tiny.json", unet_dir(work, args.alt_only), overrides, args.seed)


def stage_decoder(args, work: Path) -> Path:
    vae = str(work / "vae_refined" / "final")
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
    text_encoder_dir = work / "unet" / "text_encoder"
    vae_dir = work / "vae_decoder" / "final"
    if not vae_dir.is_dir():
        vae_dir = work / "vae_refined" / "final"
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
    pipe.save_pretrained(out)
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
