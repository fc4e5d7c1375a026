"""What a task is: the model, data and loss the one training loop runs.

A task is a class registered under a name (``@register_task("unet")``), or named in a config as
``"package.module:ClassName"``; ``train.tasks.resolve_task`` finds it (that package holds the built-in tasks). Its ``Options`` dataclass validates ``task_options``. The loop calls:

- ``build_model() -> nn.Module``: the trained network (frozen helpers such as the text encoder
  or the VAE live on the task, not in this module, so they are neither trained nor saved);
- ``batches(batch_size, rank, world_size, start) -> Iterator``: an endless, deterministic stream of
  micro-batches for one rank, starting after ``start`` micro-batches (this is how resume finds
  its place);
- ``loss(model, batch) -> (loss, metrics)``: runs inside the model's ``forward`` (so DDP/FSDP see
  it); ``metrics`` maps names to scalar tensors or floats;
- optional: ``after_step(model, step)``, ``sample(model, step) -> (N,3,H,W) in [0,1] or None``,
  ``state_dict()/load_state_dict()`` (extra tensors that must survive a resume),
  ``fsdp_units(model)`` (submodules to shard), ``export(model, directory)`` (final weights, EMA
  applied, in the model's own directory format).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn



@dataclass
class TaskContext:
    """What the loop tells a task about the run."""
    seed: int
    device: torch.device
    rank: int
    world_size: int
    activation_checkpointing: bool
    out_dir: Path
    precision: str


class Task:
    @dataclass
    class Options:
        pass

    def __init__(self, options, ctx: TaskContext):
        self.options, self.ctx = options, ctx

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, batch_size: int, rank: int, world_size: int, start: int) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def sample(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"task {type(self).__name__} keeps no extra state, but the checkpoint holds {sorted(state)[:4]}")

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.children() if any(True for _ in m.parameters())]

    def export(self, model: nn.Module, directory: Path) -> None:
        pass


TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    def wrap(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].__name__} and {cls.__name__})")
        TASKS[name] = cls
        cls.task_name = name
        return cls
    return wrap
