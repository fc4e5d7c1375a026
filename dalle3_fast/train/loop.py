"""The one training loop every model shares (nanoGPT-style: read it top to bottom)."""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm.auto import tqdm

from ..io import CheckpointError, load_state_dict_strict
from . import checkpoint as ckpt
from .config import OptimizerConfig, TrainConfig
from .distributed import (DistInfo, all_reduce_mean, barrier, destroy_on_exit, full_tensor, gradient_sync,
                          init_distributed, wrap_model)
from .ema import EMA
from .images import save_grid
from .metrics import MetricsLogger, trim_step_log
from .prefetch import Prefetcher
from .task import Task, TaskContext
from .tasks import build_task

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TaskModule(nn.Module):
    """The trained network plus its task's loss, so DDP / FSDP see the whole loss as ``forward``."""

    def __init__(self, task: Task, net: nn.Module):
        super().__init__()
        self.net = net
        self._task = (task,)  # a tuple: not registered as a submodule

    def forward(self, batch):
        return self._task[0].loss(self.net, batch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(opt: OptimizerConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    progress = (step - opt.warmup_steps) / max(1, total - opt.warmup_steps)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def move_to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _strip(state: dict, prefix: str = "net.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run ``cfg`` to ``cfg.steps`` optimizer steps; returns a summary (final step, loss, paths)."""
    info = init_distributed(cfg.device)
    with destroy_on_exit(info), ExitStack() as cleanup:
        return _train(cfg, info, cleanup, resume=resume, progress=progress)


def _train(cfg: TrainConfig, info: DistInfo, cleanup: ExitStack, *, resume: bool, progress: bool) -> dict:
    out = Path(cfg.out_dir)
    root = out / "checkpoints"
    device = info.device

    # -- model (identical initial weights on every rank) ------------------------------------
    seed_everything(cfg.seed)
    ctx = TaskContext(seed=cfg.seed, device=device, rank=info.rank, world_size=info.world_size,
                      activation_checkpointing=cfg.activation_checkpointing, out_dir=out, precision=cfg.precision)
    task = build_task(cfg.task, cfg.task_options, ctx)
    net = task.build_model().to(device)
    module = TaskModule(task, net)

    loaded = None
    existing = ckpt.list_checkpoints(root)
    if resume:
        if not existing:
            raise CheckpointError(f"--resume: no checkpoint under {str(root)!r}; run without --resume to start")
        loaded = ckpt.load_checkpoint(existing[-1], info.rank)
        for key in ("world_size", "batch_size", "grad_accum"):
            now = {"world_size": info.world_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}[key]
            if loaded.state[key] != now:
                raise CheckpointError(f"--resume: the checkpoint was made with {key}={loaded.state[key]}, this run "
                                      f"has {now}; resume with the same value")
        load_state_dict_strict(net, _strip(loaded.model), source=f"checkpoint {str(loaded.path)!r}")
        task.load_state_dict(loaded.task)
    elif existing:
        raise CheckpointError(f"{str(root)!r} already holds checkpoints; pass --resume to continue that run "
                              "or choose another --out")
    barrier(info)
    if info.is_main:
        ckpt.clean_partial(root)
        out.mkdir(parents=True, exist_ok=True)

    if cfg.compile:
        net.compile()
    wrapped = wrap_model(module, info, cfg.parallel, task.fsdp_units(net))
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"task {cfg.task!r} built a model with no trainable parameters")
    o = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = (torch.autocast(device.type, dtype=AMP_DTYPES[cfg.precision]) if cfg.precision in AMP_DTYPES
                else nullcontext())

    if loaded is not None:
        if ema is not None:
            if loaded.ema is None:
                raise CheckpointError(f"--resume: {str(loaded.path)!r} has no EMA weights but ema_decay > 0")
            ema.load_state_dict(_strip(loaded.ema, ""))
        set_optimizer_state_dict(module, opt, optim_state_dict=loaded.optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        if scaler.is_enabled():
            if loaded.state.get("grad_scaler") is None:
                raise CheckpointError("--resume: the checkpoint has no fp16 grad-scaler state; resume with the "
                                      "precision it was trained with")
            scaler.load_state_dict(loaded.state["grad_scaler"])
        ckpt.restore_rng(loaded.rng_tensors, loaded.rng_meta, device)
        start = int(loaded.state["step"])
    else:
        seed_everything(cfg.seed * 1_000_003 + 1 + info.rank)  # training noise differs per rank
        start = 0

    data = iter(task.batches(cfg.batch_size, info.rank, info.world_size, start * cfg.grad_accum))
    if cfg.prefetch:
        data = cleanup.enter_context(Prefetcher(data, cfg.prefetch))
    samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    logger = MetricsLogger(out, start if loaded is not None else None) if info.is_main else None
    if info.is_main:  # sample logs a task appends to (e.g. samples/captions.jsonl): this run re-logs past start
        for log in sorted((out / "samples").glob("*.jsonl")):
            trim_step_log(log, start)

    def save(step: int) -> Path | None:
        model_state = _strip(get_model_state_dict(module, options=FULL))
        opt_state = get_optimizer_state_dict(module, opt, options=FULL)
        ema_state = ema.state_dict() if ema is not None else None
        task_state = task.state_dict()
        if info.is_main:
            ckpt.begin_save(root, step)
        barrier(info)
        tmp = ckpt.temp_dir(root, step)
        try:
            ckpt.write_rank_files(tmp, info.rank, device)
            barrier(info)
            path = None
            if info.is_main:
                state = {"step": step, "data_position": step * cfg.grad_accum, "world_size": info.world_size,
                         "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                         "samples_seen": step * samples_per_step,
                         "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                         "config": cfg.to_dict(), "task": cfg.task}
                ckpt.write_main_files(tmp, model=model_state, ema=ema_state, optimizer=opt_state, task=task_state,
                                      state=state)
                path = ckpt.commit_save(root, step, cfg.keep_checkpoints)
        except BaseException:
            if info.is_main:
                ckpt.abort_save(root, step)
            raise
        barrier(info)
        return path

    def draw_samples(step: int) -> None:
        if info.enabled and cfg.parallel == "ddp" and not info.is_main:
            return  # FSDP forwards are collectives: there every rank draws
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast, \
                (ema.applied_to(net) if ema is not None else nullcontext()):
            images = task.sample(net, step)
        net.train()
        if info.is_main and images is not None:
            save_grid(images, out / "samples" / f"step_{step:08d}.png")

    net.train()
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (progress and info.is_main),
               dynamic_ncols=True, file=sys.stderr)
    step, last_loss, last_saved = start, None, None
    window_loss = torch.zeros((), device=device)
    window_metrics: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    while step < cfg.steps:
        lr = lr_at(o, step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = move_to(next(data), device)
            with gradient_sync(wrapped, info, cfg.parallel, sync=micro == cfg.grad_accum - 1):
                with autocast:
                    loss, metrics = wrapped(batch)
                scaler.scale(loss.float() / cfg.grad_accum).backward()
            window_loss += loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                window_metrics[k] = window_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(net)
        task.after_step(net, step + 1)
        step += 1
        window_steps += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            names = sorted(window_metrics)
            values = torch.stack([window_loss / window_steps, full_tensor(grad_norm).float().to(device)]
                                 + [torch.tensor(window_metrics[k] / window_steps, device=device) for k in names])
            values = all_reduce_mean(values, info).tolist()
            elapsed = time.perf_counter() - window_start
            rate = window_steps * samples_per_step / max(elapsed, 1e-9)
            last_loss = values[0]
            if logger is not None:
                logger.log(step, {"loss": values[0], "grad_norm": values[1], "lr": lr, "samples_per_s": rate,
                                  **dict(zip(names, values[2:]))})
            bar.set_postfix(loss=f"{values[0]:.4g}", samples_s=f"{rate:.1f}")
            window_loss.zero_()
            window_metrics.clear()
            window_start, window_steps = time.perf_counter(), 0

        if cfg.sample_every and step % cfg.sample_every == 0:
            draw_samples(step)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            last_saved = save(step)
    bar.close()

    final = None
    if info.is_main and (not info.enabled or cfg.parallel == "ddp"):
        final = out / "final"
        with (ema.applied_to(net) if ema is not None else nullcontext()), torch.no_grad():
            task.export(net, final)
        final = final if final.exists() else None
    if logger is not None:
        logger.close()
    return {"step": step, "loss": last_loss, "checkpoint": str(last_saved) if last_saved else None,
            "final": str(final) if final else None, "metrics": str(out / "metrics.jsonl")}
