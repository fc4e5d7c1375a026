"""Train DALL-E 3's three captioners on the scene world through ``python -m dalle3_fast.train``.

    python scripts/train_captioners.py --work runs/captioners --export runs/captioners/export

Stages (a stage whose result is already under ``--work`` is skipped, so the command resumes):

1. ``data``:      40 shards x 1000 images (64x64, world seed 0) with ``python -m dalle3_fast.data.world``;
2. ``pretrain``:  a tiny CoCa (convolutional image stem) on (image, alt-text), contrastive + captioning
                  loss (configs/captioner_world_pretrain.json, on all 40 shards);
3. ``finetune``:  two copies of it fine-tuned on the first 2 shards only (2000 images, 5 % of the
                  data): on the short synthetic captions (configs/captioner_world_ssc.json) and on the
                  descriptive ones (configs/captioner_world_dsc.json); the two runs go side by side
                  (one process each) unless ``--sequential``;
4. ``export``:    each final model loaded with ``CoCa.from_pretrained`` and written with
                  ``CoCa.save_pretrained`` to ``--export``/{pretrained,ssc,dsc}; ``--asset DIR`` also
                  writes the DSC captioner there with float16 weights (half the bytes; it loads back
                  as float32), e.g. ``--asset dalle3_fast/assets/captioner_dsc``.

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
STAGES = ("data", "pretrain", "finetune", "export")
TRAIN_SHARDS, FINETUNE_SHARDS, SHARD_SIZE = 40, 2, 1000
FINETUNES = {"ssc": "captioner_world_ssc.json", "dsc": "captioner_world_dsc.json"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/train_captioners.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/captioners", help="directory for the data and the runs (default runs/captioners)")
    p.add_argument("--export", default=None, help="write the three final captioners here (default WORK/export)")
    p.add_argument("--asset", default=None, help="also write the DSC captioner with float16 weights to this directory")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated stages to run (default {','.join(STAGES)})")
    p.add_argument("--train-shards", type=int, default=TRAIN_SHARDS, help=f"pre-training shards (default {TRAIN_SHARDS})")
    p.add_argument("--finetune-shards", type=int, default=FINETUNE_SHARDS,
                   help=f"fine-tuning shards, the first ones of the pre-training set (default {FINETUNE_SHARDS})")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"images per shard (default {SHARD_SIZE})")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pre-training config's steps")
    p.add_argument("--ssc-steps", type=int, default=None, help="override the SSC fine-tune config's steps")
    p.add_argument("--dsc-steps", type=int, default=None, help="override the DSC fine-tune config's steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to every training run (e.g. batch_size=16); repeatable")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training process (default 1)")
    p.add_argument("--sequential", action="store_true", help="run the SSC and DSC fine-tunes one after the other")
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


def stage_pretrain(args, work: Path, env: dict) -> None:
    out = work / "pretrain"
    if (out / "final" / "config.json").is_file():
        print(f"[captioners] pretrain: {out / 'final'} exists, skipped", file=sys.stderr)
        return
    data = shard_spec(work / "data" / "train", args.train_shards)
    cmd = train_command("captioner_world_pretrain.json", out, args.pretrain_steps,
                        [f"task_options.data={json.dumps(data)}", *args.overrides], not args.no_progress)
    wait({"pretrain": run(cmd, env)})


def stage_finetune(args, work: Path, env: dict) -> None:
    data = shard_spec(work / "data" / "train", args.finetune_shards)
    init = work / "pretrain" / "final"
    if not (init / "config.json").is_file():
        raise SystemExit(f"error: no pre-trained captioner at {init}; run the pretrain stage first")
    steps = {"ssc": args.ssc_steps, "dsc": args.dsc_steps}
    procs = {}
    for name, config in FINETUNES.items():
        out = work / name
        if (out / "final" / "config.json").is_file():
            print(f"[captioners] {name}: {out / 'final'} exists, skipped", file=sys.stderr)
            continue
        overrides = [f"task_options.data={json.dumps(data)}", f"task_options.init_from={json.dumps(str(init))}",
                     *args.overrides]
        # side by side, each run writes its progress to its own log (WORK/ssc.log, WORK/dsc.log)
        log = None if args.sequential else work / f"{name}.log"
        procs[name] = run(train_command(config, out, steps[name], overrides, not args.no_progress), env, log)
        if args.sequential:
            wait({name: procs.pop(name)})
    wait(procs)


def stage_export(args, work: Path, env: dict) -> None:
    import torch

    from dalle3_fast.models.captioner import CoCa

    export = Path(args.export) if args.export else work / "export"
    for name, run_dir in (("pretrained", "pretrain"), ("ssc", "ssc"), ("dsc", "dsc")):
        source = work / run_dir / "final"
        model = CoCa.from_pretrained(source)
        model.save_pretrained(export / name)
        print(f"[captioners] {name}: {source} -> {export / name}", file=sys.stderr)
    if args.asset:
        asset = Path(args.asset)
        if asset.exists():
            shutil.rmtree(asset)
        CoCa.from_pretrained(work / "dsc" / "final").to(torch.float16).save_pretrained(asset)
        size = sum(f.stat().st_size for f in asset.rglob("*") if f.is_file())
        print(f"[captioners] dsc (float16 weights) -> {asset} ({size / 2**20:.2f} MiB)", file=sys.stderr)


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
