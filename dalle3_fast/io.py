"""Model directories: config.json + weights in safetensors, strict loading, atomic writes.

Diffusers-compatible layout: ``DIR/config.json`` and ``DIR/diffusion_pytorch_model.safetensors``
(or ``model.safetensors`` for transformers-style models). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A model directory or weights file that cannot be loaded as asked."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_config(config: dict, directory: str | os.PathLike, name: str = CONFIG) -> None:
    atomic_write_bytes(Path(directory) / name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def read_config(directory: str | os.PathLike, name: str = CONFIG) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist; pass a directory made by "
                              "save_pretrained (it holds config.json and the weights)")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing; {str(directory)!r} is not a model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); the directory is corrupt") from exc


def load_safetensors(path: str | os.PathLike, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {str(path)!r} is corrupt or not safetensors ({exc})") from exc


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped tensor is one clear error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} (model wants {tuple(expected[k].shape)})"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def save_pretrained(module: torch.nn.Module, config: dict, directory, weights_name: str = DIFFUSERS_WEIGHTS) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(module.state_dict(), directory / weights_name)
    write_config(config, directory)


def load_weights_into(module: torch.nn.Module, directory, weights_name: str = DIFFUSERS_WEIGHTS) -> None:
    path = Path(directory) / weights_name
    load_state_dict_strict(module, load_safetensors(path), source=f"weights in {str(path)!r}")
