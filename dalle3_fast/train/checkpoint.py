"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of ``OUT/checkpoints/step_00001000/`` (the directory appears whole or not at all: it is
written as ``.tmp-step_00001000`` and renamed):

    model.safetensors       trained weights (full, unsharded, fp32); a tied weight once, under its first name
    ema.safetensors         EMA weights, same names (when ema_decay > 0)
    optimizer.safetensors   optimizer tensors as "state/<param name>/<key>"
    optimizer.json          param_groups (params by name) and non-tensor per-param state
    task.safetensors        the task's extra state (e.g. a distillation target network), if any
    rng.rank<R>.safetensors torch CPU (+ CUDA) generator state of rank R
    rng.rank<R>.json        python and numpy generator state of rank R
    state.json              step, data position per rank, grad-scaler state, world size, config

The newest complete ``step_*`` directory is the one ``--resume`` loads.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import CheckpointError, fsync_dir, fsync_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


# -- optimizer state <-> (tensors, JSON) -------------------------------------------------------
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict keyed by parameter name -> safetensors dict + JSON metadata."""
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        if not flat.startswith("state/"):
            raise CheckpointError(f"optimizer tensor {flat!r} is not of the form state/<param>/<key>")
        name, key = flat[len("state/"):].rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    for name, values in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# -- RNG ---------------------------------------------------------------------------------------
def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": {"algorithm": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]}}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    n = meta["numpy"]
    np.random.set_state((n["algorithm"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# -- files ---------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the second and later names of one tensor (tied weights such as T5's shared /
    encoder.embed_tokens, which safetensors refuses to write twice); the strict loader restores them."""
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    fsync_file(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def begin_save(root: Path, step: int) -> Path:
    """Create an empty temp directory for ``step`` (rank 0, before the others write into it)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_rank_files(tmp: Path, rank: int, device: torch.device) -> None:
    tensors, meta = capture_rng(device)
    _save_tensors(tensors, tmp / f"rng.rank{rank}.safetensors")
    _write_json(tmp / f"rng.rank{rank}.json", meta)


def write_main_files(tmp: Path, *, model: dict, ema: dict | None, optimizer: dict, task: dict, state: dict) -> None:
    _save_tensors(_without_aliases(model), tmp / "model.safetensors")
    if ema is not None:
        _save_tensors(ema, tmp / "ema.safetensors")
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", opt_meta)
    if task:
        _save_tensors(task, tmp / "task.safetensors")
    _write_json(tmp / "state.json", state)


def commit_save(root: Path, step: int, keep: int) -> Path:
    """Rename the finished temp directory into place, then drop all but the newest ``keep``.

    Every file was fsynced when written; the temp directory is fsynced before the rename and ``root``
    after it, so a power cut leaves either no checkpoint or a whole one."""
    tmp, final = temp_dir(root, step), root / step_dir_name(step)
    fsync_dir(tmp)
    if final.exists():  # only when a step is reached twice; move the old one aside first
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    stale = list_checkpoints(root)[:-keep]
    for path in stale:
        shutil.rmtree(path)
    if stale:
        fsync_dir(root)
    return final


def abort_save(root: Path, step: int) -> None:
    shutil.rmtree(temp_dir(root, step), ignore_errors=True)


def clean_partial(root: Path) -> None:
    """Remove temp directories a crash left behind (they never count as checkpoints)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


@dataclass
class LoadedCheckpoint:
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    task: dict[str, torch.Tensor]
    state: dict
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing or corrupt ({exc})") from exc


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing or corrupt ({exc})") from exc


def load_checkpoint(path: Path, rank: int) -> LoadedCheckpoint:
    state = _load_json(path / "state.json")
    ema_path, task_path = path / "ema.safetensors", path / "task.safetensors"
    opt_meta = _load_json(path / "optimizer.json")
    return LoadedCheckpoint(
        path=path,
        model=_load_tensors(path / "model.safetensors"),
        ema=_load_tensors(ema_path) if ema_path.exists() else None,
        optimizer=unflatten_optimizer_state(_load_tensors(path / "optimizer.safetensors"), opt_meta),
        task=_load_tensors(task_path) if task_path.exists() else {},
        state=state,
        rng_tensors=_load_tensors(path / f"rng.rank{rank}.safetensors"),
        rng_meta=_load_json(path / f"rng.rank{rank}.json"),
    )
