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


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename (or a file creation/removal) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log that is never rewritten (created with its directory when absent), durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(path.parent)


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
        fsync_dir(path.parent)
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
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{str(path)!r} cannot be read ({exc}); check its permissions") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); the directory is corrupt") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object; the directory "
                              "is corrupt")
    return config


PICKLED_WEIGHTS = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "model.ckpt", "model.pt", "model.pth")


def no_weights_error(directory: str | os.PathLike, wanted: str, what: str = "weights") -> CheckpointError:
    """The error for a model directory without safetensors weights (naming pickled ones if that is what it has)."""
    directory = Path(directory)
    pickled = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        return CheckpointError(f"{str(directory)!r} holds {', '.join(pickled[:3])} but no {wanted}: pickled weights "
                               "are never loaded (unpickling can run code); convert them to safetensors "
                               "(e.g. save_pretrained(..., safe_serialization=True))")
    return CheckpointError(f"no {what} in {str(directory)!r}: expected {wanted}")


def load_safetensors(path: str | os.PathLike, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise no_weights_error(path.parent, path.name)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"weights file {str(path)!r} is corrupt or not safetensors ({detail})") from exc


def load_safetensors_weights(directory: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """``DIR/name``, or the shards its ``DIR/name.index.json`` (transformers/diffusers layout) lists."""
    directory = Path(directory)
    if (directory / name).is_file():
        return load_safetensors(directory / name)
    index = directory / f"{name}.index.json"
    if not index.is_file():
        raise no_weights_error(directory, name)
    weight_map = read_config(directory, index.name).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v and v.endswith(
            ".safetensors") for v in weight_map.values()):
        raise CheckpointError(f"{str(index)!r} has no valid weight_map (tensor name -> .safetensors file in the "
                              "same directory)")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_safetensors(directory / shard)
        stray = sorted(k for k in tensors if weight_map.get(k) != shard)
        if stray:
            raise CheckpointError(f"{str(directory / shard)!r} holds {', '.join(stray[:4])}, which {str(index)!r} "
                                  "does not place there; the index and its shards do not match")
        state.update(tensors)
    return state


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def tied_names(module: torch.nn.Module) -> list[list[str]]:
    """State-dict names that are one tensor (tied weights, e.g. T5's shared / encoder.embed_tokens), in groups."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                     source: str = "weights") -> dict[str, torch.Tensor]:
    """``state`` completed with the aliases of tied weights, or one CheckpointError naming every missing,
    unexpected or mis-shaped tensor. A tied group needs one of its names; several must hold equal values."""
    expected = module.state_dict(keep_vars=True)
    state = dict(state)
    problems = []
    for group in tied_names(module):
        given = [n for n in group if n in state]
        if not given:
            continue  # reported as missing below, under each name
        first = state[given[0]]
        unequal = [n for n in given[1:] if state[n].shape != first.shape or not torch.equal(state[n], first)]
        if unequal:
            problems.append(f"tied tensors differ: {given[0]} vs {', '.join(unequal)}")
        for n in group:
            state.setdefault(n, first)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} (model wants {tuple(expected[k].shape)})"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
        if names:
            problems.append(f"{label}: {_shown(names)}")
    if problems:
        raise CheckpointError(f"{source} do not fit {type(module).__name__}: " + "; ".join(problems))
    return state


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights",
                           *, assign: bool = False) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped tensor is one clear error.

    ``assign=True`` takes the tensors themselves (for a module built on the meta device); tied weights
    stay tied.
    """
    full = check_state_dict(module, state, source)
    groups = tied_names(module)
    module.load_state_dict(full, strict=True, assign=assign)
    if assign:
        for group in groups:  # assignment gave each name its own Parameter: share the first again
            tensor = module.get_parameter(group[0]) if _is_parameter(module, group[0]) else module.get_buffer(group[0])
            for name in group[1:]:
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner) if owner else module, attr, tensor)


def _is_parameter(module: torch.nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in (module.get_submodule(owner) if owner else module)._parameters


def save_pretrained(module: torch.nn.Module, config: dict, directory, weights_name: str = DIFFUSERS_WEIGHTS) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(module.state_dict(), directory / weights_name)
    write_config(config, directory)


def load_weights_into(module: torch.nn.Module, directory, weights_name: str = DIFFUSERS_WEIGHTS) -> None:
    path = Path(directory) / weights_name
    load_state_dict_strict(module, load_safetensors_weights(directory, weights_name),
                           source=f"weights in {str(path)!r}")
