"""Metrics to ``OUT/metrics.jsonl`` (one JSON object per logged step) and TensorBoard if installed."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import atomic_write_bytes


def _step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):  # a line cut short by a kill
        return None
    return step if isinstance(step, int) else None


def trim_step_log(path: Path, last_step: int) -> None:
    """Keep the lines of a JSON-lines log whose ``step`` is at most ``last_step`` (what the checkpoint a run
    resumes from had seen); what a killed run logged past it, and lines a kill cut short, are dropped."""
    if path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (step := _step(line)) is not None and step <= last_step]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


class MetricsLogger:
    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            atomic_write_bytes(self.path, b"")
        else:
            trim_step_log(self.path, resume_step)
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
