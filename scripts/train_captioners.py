"""Train DALL-E 3's captioners on the scene world through ``python -m dalle3_fast.train``.

    python scripts/train_captioners.py --work runs/captioners --export runs/captioners/export

Stages (a stage whose result is already under ``--work`` is skipped, so the command resumes):

1. ``data``:      40 shards x 1000 images (64x64, world seed 0) with ``python -m dalle3_fast.data.world``;
2. ``dsc``:       the descriptive-caption (DSC) captioner: a tiny CoCa (convolutional image stem, text
                  decoder cross-attending to every grid token) trained from scratch on the world's
                  descriptive captions, contrastive + captioning loss (configs/captioner_world_dsc.json:
                  world seed 0 drawn on the fly, the same world the shards hold, so no image repeats);
3. ``deepen``:    that captioner's text decoder grown from 2 to 4 multimodal layers (the new ones start as
                  identities) and fine-tuned on the same stream with the grounding loss (each named group's
                  centre regressed from the decoder's state at its mention) and spatial words weighted 5x
                  (configs/captioner_world_deepen.json); it is what ``export`` writes as ``dsc``;
4. ``ssc``:       the short-caption (SSC) captioner: the deepened DSC one fine-tuned on the short captions of
                  the first 2 shards (configs/captioner_world_ssc.json);
5. ``pretrain``:  (not run unless named) a CoCa pre-trained on the shards' alt-text only
                  (configs/captioner_world_pretrain.json): the noisy-caption baseline of the evaluation;
6. ``export``:    each final model loaded with ``CoCa.from_pretrained`` and written with
                  ``CoCa.save_pretrained`` to ``--export``/{dsc,ssc[,pretrained]}; ``--asset DIR`` (and
                  ``--ssc-asset DIR``) also write the DSC (SSC) captioner there with float16 weights (half
                  the bytes; it loads back as float32), e.g. ``--asset dalle3_fast/assets/captioner_dsc``.

Runs use ``OMP_NUM_THREADS=--threads`` (default 1: on a shared machine more threads than free cores
makes OpenMP spin and every step slower). An interrupted run resumes from its newest checkpoint.
Then measure them with scripts/eval_captioner.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STAGES = ("data", "dsc", "deepen", "ssc", "pretrain", "export")
DEFAULT_STAGES = ("data", "dsc", "deepen", "ssc", "export")
TRAIN_SHARDS, FINETUNE_SHARDS, SHARD_SIZE = 40, 2, 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/train_captioners.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/captioners", help="directory for the data and the runs (default runs/captioners)")
    p.add_argument("--export", default=None, help="write the three final captioners here (default WORK/export)")
    p.add_argument("--asset", default=None, help="also write the DSC captioner with float16 weights to this directory")
    p.add_argument("--ssc-asset", default=None, help="also write the SSC captioner with float16 weights to this directory")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated stages to run, of {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)})")
    p.add_argument("--train-shards", type=int, default=TRAIN_SHARDS, help=f"pre-training shards (default {TRAIN_SHARDS})")
    p.add_argument("--finetune-shards", type=int, default=FINETUNE_SHARDS,
                   help=f"the SSC fine-tune's shards, the first ones of the data (default {FINETUNE_SHARDS})")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"images per shard (default {SHARD_SIZE})")
    p.add_argument("--dsc-steps", type=int, default=None, help="override the DSC config's steps")
    p.add_argument("--deepen-steps", type=int, default=None, help="override the deepened DSC fine-tune config's steps")
    p.add_argument("--ssc-steps", type=int, default=None, help="override the SSC fine-tune config's steps")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the alt-text pre-training config's steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to every training run (e.g. batch_size=16); repeatable")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training process (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown stage {unknown[0]!r}; use some of {', '.join(STAGES)}")
    if min(args.train_shards, args.finetune_shards, args.shard_size, args.threads) < 1:
        p.error("--train-shards, --finetune-shards, --shard-size and --threads must be >= 1")
    if args.finetune_shards > args.train_shards:
        p.error("--finetune-shards must not exceed --train-shards (the fine-tuning set is part of the data)")
    args.stages = stages
    return args


def shard_spec(directory: Path, count: int) -> str:
    return str(directory / f"{{000000..{count - 1:06d}}}.tar")


def run(cmd: list[str], env: dict, log: Path | None = None) -> subprocess.Popen:
    print("[captioners] " + " ".join(cmd), file=sys.stderr)
    out = open(log, "a") if log is not None else None
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, cwd=os.getcwd())


def wait(procs: dict[str, subprocess.Popen]) -> None:
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise SystemExit(f"error: training run(s) {', '.join(failed)} failed; see their output above or WORK/*.log")


def train_command(config: str, out: Path, steps: int | None, overrides: list[str], progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dalle3_fast.train", str(CONFIGS / config), "--out", str(out)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    for item in overrides:
        cmd += ["--set", item]
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")):
        cmd.append("--resume")
    if not progress:
        cmd.append("--no-progress")
    return cmd


def stage_data(args, work: Path, env: dict) -> None:
    n = args.train_shards * args.shard_size
    cmd = [sys.executable, "-m", "dalle3_fast.data.world", "--out", str(work / "data" / "train"), "--n", str(n),
           "--size", "64", "--seed", "0", "--shard-size", str(args.shard_size), "--workers", str(args.threads)]
    wait({"data": run(cmd, env)})


def _train_stage(name: str, config: str, steps: int | None, overrides: list[str], args, work: Path, env: dict) -> None:
    out = work / name
    if (out / "final" / "config.json").is_file():
        print(f"[captioners] {name}: {out / 'final'} exists, skipped", file=sys.stderr)
        return
    cmd = train_command(config, out, steps, [*overrides, *args.overrides], not args.no_progress)
    wait({name: run(cmd, env)})


def stage_dsc(args, work: Path, env: dict) -> None:
    _train_stage("dsc", "captioner_world_dsc.json", args.dsc_steps, [], args, work, env)


def _init_from(work: Path, source: str, name: str) -> Path:
    init = work / source / "final"
    if not (init / "config.json").is_file() and not (work / name / "final" / "config.json").is_file():
        raise SystemExit(f"error: no captioner at {init} to fine-tune; run the {source} stage first")
    return init


def stage_deepen(args, work: Path, env: dict) -> None:
    init = _init_from(work, "dsc", "deepen")
    _train_stage("deepen", "captioner_world_deepen.json", args.deepen_steps,
                 [f"task_options.init_from={json.dumps(str(init))}"], args, work, env)


def stage_ssc(args, work: Path, env: dict) -> None:
    init = _init_from(work, "deepen", "ssc")
    data = shard_spec(work / "data" / "train", args.finetune_shards)
    _train_stage("ssc", "captioner_world_ssc.json", args.ssc_steps,
                 [f"task_options.data={json.dumps(data)}", f"task_options.init_from={json.dumps(str(init))}"],
                 args, work, env)


def stage_pretrain(args, work: Path, env: dict) -> None:
    data = shard_spec(work / "data" / "train", args.train_shards)
    _train_stage("pretrain", "captioner_world_pretrain.json", args.pretrain_steps,
                 [f"task_options.data={json.dumps(data)}"], args, work, env)


def _write_half(source: Path, asset: Path, name: str) -> None:
    import torch

    from dalle3_fast.models.captioner import CoCa

    if asset.exists():
        shutil.rmtree(asset)
    CoCa.from_pretrained(source).to(torch.float16).save_pretrained(asset)
    size = sum(f.stat().st_size for f in asset.rglob("*") if f.is_file())
    print(f"[captioners] {name} (float16 weights) -> {asset} ({size / 2**20:.2f} MiB)", file=sys.stderr)


def stage_export(args, work: Path, env: dict) -> None:
    from dalle3_fast.models.captioner import CoCa

    export = Path(args.export) if args.export else work / "export"
    for name, run_dir, required in (("dsc", "deepen", True), ("ssc", "ssc", True), ("pretrained", "pretrain", False)):
        source = work / run_dir / "final"
        if not (source / "config.json").is_file():
            if required:
                raise SystemExit(f"error: no {name} captioner at {source}; run the {run_dir} stage first")
            continue
        CoCa.from_pretrained(source).save_pretrained(export / name)
        print(f"[captioners] {name}: {source} -> {export / name}", file=sys.stderr)
    if args.asset:
        _write_half(work / "deepen" / "final", Path(args.asset), "dsc")
    if args.ssc_asset:
        _write_half(work / "ssc" / "final", Path(args.ssc_asset), "ssc")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for name in args.stages:
        t0 = time.perf_counter()
        globals()[f"stage_{name}"](args, work, env)
        print(f"[captioners] stage {name} done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
