"""Build the embedded tiny pipeline (dalle3_fast/assets/tiny_pipeline) from nothing but the scene world.

    python scripts/build_tiny_pipeline.py --out dalle3_fast/assets/tiny_pipeline

Stages (each one's result is kept under ``--work``, so a stage that already finished is skipped
when the command is run again, and an interrupted training stage resumes from its newest checkpoint):

1. ``vae``:        the tiny KL-f8 VAE (64x64x3 -> 8x8x4), task ``vae`` of ``python -m dalle3_fast.train`` with
                   configs/vae_tiny.json: MSE + L1 weighted towards the shapes' pixels, KL 1e-6. With
                   ``--vae-latent-channels C`` > 4 that VAE (WORK/vae4) is widened to C latent channels and
                   fine-tuned (configs/vae_tiny_widen.json) into WORK/vae; the U-Net and the latent decoder
                   are built for the VAE's latent channels;
2. ``data``:       the training set, ``--shards`` world shards of ``--shard-size`` images (world seed 0,
                   each sample with its alt-text and, in its json, the world's true captions), written by
                   scripts/train_captioners.py's data stage to WORK/captioners/data/train;
3. ``captioners``: the rest of scripts/train_captioners.py into WORK/captioners: the DSC captioner (a
                   tiny CoCa, conv stem, trained on the world's descriptive captions drawn on the fly), its
                   text decoder deepened to 4 multimodal layers and fine-tuned with the grounding loss
                   (the shipped captioner's recipe), and the SSC fine-tune of that on the first ``--finetune-shards`` shards,
                   exported to WORK/captioners/export/{dsc,ssc};
4. ``recaption``:  ``python -m dalle3_fast.recaption`` with that DSC captioner over the whole training set,
                   as a user would on their own shards: WORK/recaptioned/ holds the same shards plus a
                   ``.dsc`` member per sample (resumable: finished shards are skipped);
5. ``unet``:       the tiny U-Net (task ``unet``, configs/unet_tiny.json, 10 % caption drop for
                   classifier-free guidance) on the training shards. ``--variant`` picks its captions, the
                   paper's ablation (same architecture, seed, images and steps; each into its own work
                   directory): ``captioner-95`` (default: 95 % the ``.dsc`` members the recaption job
                   wrote, read with ``synthetic_member: "dsc"``, 5 % alt-text), ``captioner-65``,
                   ``oracle-95`` (the world's true DSCs: the ceiling a perfect captioner would reach) and
                   ``alt-only`` (synthetic ratio 0; ``--alt-only`` is the same). The first U-Net run
                   trains a SentencePiece tokenizer on scene-world captions and builds the tiny T5 text
                   encoder, randomly initialised and frozen; the other variants reuse it when it exists.
                   ``--train-text-encoder`` trains that encoder with the U-Net instead (task option
                   ``train_text_encoder``): every variant starts from the same shared initial encoder
                   and trains its own copy, exported to its run's final/text_encoder;
6. ``decoder``:    the tiny latent diffusion decoder (task ``decoder``), then its 2-step consistency
                   distillation (task ``decoder_distill``);
7. ``upsampler``:  the local prompt upsampler (a small T5 seq2seq with its own SentencePiece tokenizer,
                   trained on SSC -> DSC caption pairs of the world);
8. ``assemble``:   Dalle3Pipeline.save_pretrained(--out) with the ``--variant``'s U-Net and its text
                   encoder: the one the run trained (final/text_encoder) if it did, else the frozen one.

Deterministic: every stage is seeded (model init, data order and captions come from fixed seeds), so
the same command on the same software gives the same weights up to floating-point summation order.
``--scale`` multiplies every step count and shrinks the shard set with it (at least 2 shards of 16
images); README, "Retraining the embedded pipeline", gives the commands that run stages side by side
in the background and what each cost.
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
STAGES = ("vae", "data", "captioners", "recaption", "unet", "decoder", "upsampler", "assemble")
EVAL_SIZE = "64x64"
# --variant -> (U-Net work directory, synthetic caption source, synthetic ratio)
VARIANTS = {"captioner-95": ("unet", "captioner", 0.95), "captioner-65": ("unet_captioner65", "captioner", 0.65),
            "oracle-95": ("unet_oracle95", "oracle", 0.95), "alt-only": ("unet_alt", "none", 0.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="pipeline directory to write (model_index.json + parts)")
    p.add_argument("--work", default="runs/tiny_pipeline",
                   help="directory for the stages' training runs; finished stages found here are reused")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="captioner-95",
                   help="the U-Net's captions: 95%% / 65%% our captioner's DSCs (the recaptioned shards' .dsc "
                        "members), 95%% the world's true DSCs (oracle), or alt-text only (default captioner-95)")
    p.add_argument("--alt-only", action="store_true", help="the same as --variant alt-only")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in order (default: all of {','.join(STAGES)})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's step count (e.g. 0.01 for a smoke run, 3 for a better model); "
                        "below 1 it also shrinks the training set (at least 2 shards x 16 images)")
    p.add_argument("--shards", type=int, default=40, help="training-set shards (world seed 0; default 40)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per training-set shard (default 1000)")
    p.add_argument("--finetune-shards", type=int, default=2,
                   help="the first shards, with their true SSCs, are the SSC captioner's fine-tuning set (default 2)")
    p.add_argument("--vae-steps", type=int, default=3600, help="4-channel VAE optimizer steps (batch 16)")
    p.add_argument("--vae-latent-channels", type=int, default=VAE_LATENT_CHANNELS,
                   help="VAE latent channels (default %(default)s); above 4 the 4-channel VAE is widened to them "
                        "and fine-tuned for --vae-widen-steps")
    p.add_argument("--vae-widen-steps", type=int, default=800,
                   help="fine-tuning steps of the widened VAE (batch 16; only with --vae-latent-channels > 4)")
    p.add_argument("--dsc-steps", type=int, default=6000, help="DSC captioner steps (batch 32)")
    p.add_argument("--deepen-steps", type=int, default=6000,
                   help="fine-tuning steps of the DSC captioner deepened to 4 multimodal layers (batch 32)")
    p.add_argument("--ssc-steps", type=int, default=300, help="SSC captioner fine-tune steps (batch 32)")
    p.add_argument("--unet-steps", type=int, default=4000,
                   help="U-Net optimizer steps (batch 32; each encoded image batch serves 4 steps)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the tiny T5 text encoder jointly with the U-Net instead of keeping it frozen "
                        "(each variant trains its own copy from the same initial encoder)")
    p.add_argument("--decoder-steps", type=int, default=500, help="latent decoder steps (batch 16)")
    p.add_argument("--distill-steps", type=int, default=20, help="consistency distillation steps (batch 16)")
    p.add_argument("--upsampler-steps", type=int, default=800, help="local upsampler steps (batch 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest on a machine whose cores are shared with other jobs")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="checkpoint interval of the training stages, which resume from the newest one when run "
                        "again (default 0: a twentieth of the stage's steps, at least 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = p.parse_args(argv)
    if args.alt_only:
        args.variant = "alt-only"
    if args.vae_latent_channels < 4:
        p.error(f"--vae-latent-channels {args.vae_latent_channels}: the 4-channel VAE can only be widened; use >= 4")
    if min(args.shards, args.shard_size, args.finetune_shards) < 1 or args.finetune_shards > args.shards:
        p.error("--shards, --shard-size and --finetune-shards must be >= 1, with --finetune-shards <= --shards")
    return args


class BuildError(Exception):
    """A stage cannot run: one line saying why and what to run first."""


def _steps(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _ckpt_every(args, steps: int) -> int:
    return args.ckpt_every or max(50, steps // 20)


def _run(config: str, out: Path, overrides: dict, args) -> Path:
    """One ``python -m dalle3_fast.train`` run in this process (same code path as the CLI); an earlier
    attempt that was stopped resumes from its newest checkpoint (the CLI's --resume)."""
    from dalle3_fast.io import atomic_write_bytes
    from dalle3_fast.train.checkpoint import list_checkpoints
    from dalle3_fast.train.config import load_config
    from dalle3_fast.train.loop import train

    final = out / "final"
    if final.is_dir():
        print(f"[build] {out} already trained; reusing {final}", file=sys.stderr)
        return final
    settings = {**overrides, "out_dir": str(out), "seed": args.seed, "device": "cpu", "sample_every": 0,
                "ckpt_every": _ckpt_every(args, overrides["steps"])}
    cfg = load_config(CONFIGS / config, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    existing = list_checkpoints(out / "checkpoints")
    if existing:
        print(f"[build] {out}: resuming from {existing[-1].name}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "build_stage.json", (json.dumps({"config": config, "set": settings}, indent=2,
                                                             sort_keys=True) + "\n").encode())
    t0 = time.perf_counter()
    summary = train(cfg, resume=bool(existing))
    print(f"[build] {config}: {cfg.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min, "
          f"final loss {summary['loss'] if summary['loss'] is None else format(summary['loss'], '.4g')}",
          file=sys.stderr)  # None: resumed from the last step's checkpoint, only the export was left
    return final


# The build's VAE latent channels. 4: configs/vae_tiny.json alone (the shipped VAE). More: that VAE widened
# to them and fine-tuned (SD3 / FLUX use 16); 16 channels and 800 fine-tuning steps bought 6 points of detector
# shape agreement (0.42 -> 0.48, README "Latent channels"), too little yet to make it the default.
VAE_LATENT_CHANNELS = 4


def stage_vae(args, work: Path) -> Path:
    """vae_config("tiny") (32/64/64/64 channels, 8x8x4 latents for 64x64 images) from scratch
    (configs/vae_tiny.json): MSE + 0.1 L1 with the shapes' pixels weighted 11x against the background, and
    the posterior's log-variance head starting at std 0.01 (see the ``vae`` task). Plain L1 learns the
    background first and after as many steps draws grey blobs: hue, which is the point of these pictures,
    comes last. With ``--vae-latent-channels`` above 4 that run goes to WORK/vae4, and its VAE is widened
    (``widen_latent_channels``: it reconstructs as before, the decoder learns to read the new channels) and
    fine-tuned into WORK/vae (configs/vae_tiny_widen.json); 16 channels from scratch were at 15 dB after
    400 steps, where widening starts at the 4-channel VAE's 24 dB."""
    steps = {"steps": _steps(args.vae_steps, args.scale)}
    if args.vae_latent_channels == 4:
        return _run("vae_tiny.json", work / "vae", steps, args)
    narrow = _run("vae_tiny.json", work / "vae4", steps, args)
    return _run("vae_tiny_widen.json", work / "vae",
                {"steps": _steps(args.vae_widen_steps, args.scale), "task_options.model": str(narrow),
                 "task_options.model_config": {"latent_channels": args.vae_latent_channels}}, args)


def training_set(args) -> tuple[int, int, int]:
    """(shards, images per shard, fine-tuning shards) at this --scale."""
    shards = max(2, round(args.shards * min(1.0, args.scale)))
    size = max(16, round(args.shard_size * min(1.0, args.scale)))
    return shards, size, max(1, min(shards, round(args.finetune_shards * min(1.0, args.scale))))


def shard_spec(directory: Path, count: int) -> str:
    return str(directory / f"{{000000..{count - 1:06d}}}.tar")


def captioners_dir(work: Path) -> Path:
    return work / "captioners"


def world_shards(args, work: Path) -> str:
    return shard_spec(captioners_dir(work) / "data" / "train", training_set(args)[0])


def recaptioned_shards(args, work: Path) -> str:
    return shard_spec(work / "recaptioned", training_set(args)[0])


def _train_captioners(args, work: Path, stages: str) -> None:
    """scripts/train_captioners.py's ``stages``; it skips what is finished and resumes interrupted runs."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_captioners
    finally:
        sys.path.pop(0)
    shards, size, finetune = training_set(args)
    argv = ["--work", str(captioners_dir(work)), "--train-shards", str(shards), "--shard-size", str(size),
            "--finetune-shards", str(finetune), "--threads", str(args.threads), "--no-progress",
            "--ssc-steps", str(_steps(args.ssc_steps, args.scale)),
            "--deepen-steps", str(_steps(args.deepen_steps, args.scale)),
            "--dsc-steps", str(_steps(args.dsc_steps, args.scale)), "--set", f"seed={args.seed}",
            "--stages", stages]
    if args.scale < 1:  # the captions of 2000 scenes train the tokenizer; a smoke run needs fewer
        argv += ["--set", f"task_options.tokenizer_scenes={max(100, round(2000 * args.scale))}"]
    t0 = time.perf_counter()
    if train_captioners.main(argv) != 0:
        raise BuildError(f"scripts/train_captioners.py --stages {stages} failed (see above)")
    print(f"[build] train_captioners {stages}: {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)


def stage_data(args, work: Path) -> str:
    _train_captioners(args, work, "data")
    return world_shards(args, work)


def stage_captioners(args, work: Path) -> Path:
    """The DSC captioner, its deepened fine-tune (the DSC captioner exported), the SSC fine-tune, export."""
    _train_captioners(args, work, "dsc,deepen,ssc,export")
    return captioners_dir(work) / "export" / "dsc"


def stage_recaption(args, work: Path) -> Path:
    """The user's command: ``python -m dalle3_fast.recaption --captioner DSC --input SHARDS --output DIR``."""
    import os
    import subprocess

    captioner = captioners_dir(work) / "export" / "dsc"
    if not (captioner / "config.json").is_file():
        raise BuildError(f"no DSC captioner at {captioner}; run the captioners stage first")
    out = work / "recaptioned"
    cmd = [sys.executable, "-m", "dalle3_fast.recaption", "--captioner", str(captioner), "--input",
           world_shards(args, work), "--output", str(out), "--style", "dsc", "--device", "cpu", "--no-progress"]
    print("[build] " + " ".join(cmd), file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    if subprocess.run(cmd, env=env).returncode != 0:
        raise BuildError("the recaption stage failed (see above)")
    print(f"[build] recaption: {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return out


def unet_dir(work: Path, variant: str) -> Path:
    return work / VARIANTS[variant][0]


def unet_data(args, work: Path) -> dict:
    """The U-Net's shards and caption options for --variant."""
    _, source, ratio = VARIANTS[args.variant]
    if source == "captioner":
        data = recaptioned_shards(args, work)
        missing = [p for p in _expand(data) if not Path(p).is_file()]
        if missing:
            raise BuildError(f"--variant {args.variant} trains on the recaptioned shards, but {missing[0]} "
                             "is missing; run the data, captioners and recaption stages first")
        return {"task_options.data": data, "task_options.synthetic_member": "dsc",
                "task_options.synthetic_ratio": ratio}
    data = world_shards(args, work)
    missing = [p for p in _expand(data) if not Path(p).is_file()]
    if missing:
        raise BuildError(f"the U-Net trains on the training-set shards, but {missing[0]} is missing; "
                         "run the data stage first")
    return {"task_options.data": data, "task_options.synthetic_ratio": ratio}


def _expand(spec: str) -> list[str]:
    from dalle3_fast.data.shards import expand_shards

    return list(expand_shards(spec))


# Twice the widths of unet_config "tiny": binding a colour and a shape to a place takes more than 32 channels.
UNET_OVERRIDES = dict(block_out_channels=[64, 128], norm_num_groups=16, attention_head_dim=[2, 4])


def vae_latent_channels(work: Path) -> int:
    """Latent channels of the trained VAE: the U-Net and the latent decoder are built to match them."""
    config = work / "vae" / "final" / "config.json"
    if not config.is_file():
        raise BuildError(f"{config} is missing; run the vae stage first")
    return int(json.loads(config.read_text()).get("latent_channels", 4))


def stage_unet(args, work: Path) -> Path:
    import torch

    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.unet_config import unet_config

    data = unet_data(args, work)
    init = work / "unet_init"
    if not (init / "config.json").is_file():
        torch.manual_seed(args.seed)
        c = vae_latent_channels(work)
        UNet(unet_config("tiny", **UNET_OVERRIDES, in_channels=c, out_channels=c)).save_pretrained(init)
    overrides = {"steps": _steps(args.unet_steps, args.scale), "ema_decay": 0.995, "log_every": 25,
                 "task_options.model": str(init), "task_options.vae": str(work / "vae" / "final"),
                 "task_options.text_encoder": "tiny", "task_options.buckets": [[64, 64]],
                 "task_options.latent_reuse": 4,
                 "optimizer.lr": 1e-3, "optimizer.warmup_steps": 100, "optimizer.schedule": "cosine",
                 "optimizer.min_lr_ratio": 0.1, **data}
    out = unet_dir(work, args.variant)
    shared = work / "unet" / "text_encoder"
    if out != work / "unet" and not (out / "text_encoder").is_dir() and (shared / "config.json").is_file():
        overrides["task_options.text_encoder"] = str(shared)  # the same initial encoder as the default run
    if args.train_text_encoder:
        overrides["task_options.train_text_encoder"] = True
    _check_same_text_encoder_training(out, args.train_text_encoder)
    return _run("unet_tiny.json", out, overrides, args)


def _trains_text_encoder(run: Path) -> bool:
    """Whether the U-Net run in ``run`` was started with --train-text-encoder (its build_stage.json says)."""
    stage = run / "build_stage.json"
    return stage.is_file() and json.loads(stage.read_text())["set"].get("task_options.train_text_encoder", False)


def _check_same_text_encoder_training(out: Path, train: bool) -> None:
    """A finished or checkpointed U-Net run is reused or resumed only with the flag it was started with."""
    from dalle3_fast.train.checkpoint import list_checkpoints

    started = (out / "final").is_dir() or bool(list_checkpoints(out / "checkpoints"))
    if started and _trains_text_encoder(out) != train:
        was = "with" if _trains_text_encoder(out) else "without"
        raise BuildError(f"{out} was trained {was} --train-text-encoder; pass the same flags to reuse or resume it, "
                         "or choose another --work")


def stage_decoder(args, work: Path) -> Path:
    vae = str(work / "vae" / "final")
    c = vae_latent_channels(work)
    latents = {"latent_channels": c, "decoder_in_channels": 3 + c, "latents_mean": [0.0] * c, "latents_std": [1.0] * c}
    teacher = _run("decoder_tiny.json", work / "decoder",
                   {"steps": _steps(args.decoder_steps, args.scale), "ema_decay": 0.99, "log_every": 25,
                    "task_options.vae": vae, "task_options.model_config": latents, "optimizer.lr": 5e-4}, args)
    return _run("decoder_distill_tiny.json", work / "decoder_distill",
                {"steps": _steps(args.distill_steps, args.scale), "log_every": 25, "task_options.vae": vae,
                 "task_options.teacher": str(teacher)}, args)


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

    unet_run = unet_dir(work, args.variant)
    sched = json.loads((unet_run / "final" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule({"squaredcos_cap_v2": "cosine"}.get(sched["beta_schedule"], sched["beta_schedule"]),
                             sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"])
    text_encoder_dir = unet_run / "final" / "text_encoder"  # the encoder the run trained (--train-text-encoder)
    if not (text_encoder_dir / "config.json").is_file():
        if _trains_text_encoder(unet_run):
            raise BuildError(f"{unet_run} trained its text encoder but {text_encoder_dir} is missing; delete "
                             f"{unet_run / 'final'} and run the unet stage again to export it")
        # frozen: a variant run started before the default run had built its encoder made its own
        text_encoder_dir = unet_run / "text_encoder"
        if not (text_encoder_dir / "config.json").is_file():
            text_encoder_dir = work / "unet" / "text_encoder"
    print(f"[build] text encoder: {text_encoder_dir}", file=sys.stderr)
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
        try:
            globals()[f"stage_{name}"](args, work)
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"[build] stages {','.join(stages)} done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
