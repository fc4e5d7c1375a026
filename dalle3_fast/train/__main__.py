"""``python -m dalle3_fast.train CONFIG [--set key=value ...] [--resume] [--out DIR]``.

Several processes or hosts: ``torchrun --nproc-per-node N -m dalle3_fast.train CONFIG``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..io import CheckpointError
from .config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dalle3_fast.train",
                                description="Train a model of the dalle3_fast stack from a JSON/YAML config. Under "
                                            "torchrun (RANK/WORLD_SIZE set) it trains data-parallel (DDP, or FSDP "
                                            "with parallel=fsdp).")
    p.add_argument("config", help="path to the training config (JSON, or YAML with PyYAML installed); see configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested ones, value parsed as JSON "
                        "(e.g. --set optimizer.lr=3e-4 --set task_options.prediction_type=v_prediction); repeatable")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint under OUT/checkpoints (same world size and batch)")
    p.add_argument("--out", default=None, help="output directory (overrides the config's out_dir)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides the config's steps)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"out_dir={json.dumps(args.out)}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from .loop import train
        from .config import build_dataclass
        from .tasks import resolve_task
        build_dataclass(resolve_task(cfg.task).Options, cfg.task_options, prefix="task_options.")  # fail early
        out = Path(cfg.out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"out_dir {str(out)!r} cannot be a directory ({exc.strerror or exc}); "
                              "choose another --out") from exc
        summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # bad data paths, model options the task refused
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file the run reads or writes (disk full, permissions, a path that is a file)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
