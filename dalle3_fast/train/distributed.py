"""Process group set-up from torchrun's environment, and DDP / FSDP wrapping."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when torchrun set WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available; use auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def wrap_model(module: nn.Module, info: DistInfo, parallel: str, units: list[nn.Module]) -> nn.Module:
    """DDP, or FSDP2 ``fully_shard`` on each unit and then the root (in place)."""
    if not info.enabled:
        return module
    if parallel == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    for unit in units:
        fully_shard(unit)
    fully_shard(module)
    return module


def gradient_sync(wrapped: nn.Module, info: DistInfo, parallel: str, sync: bool):
    """Context that skips the gradient all-reduce on micro-batches that are not the last."""
    if not info.enabled or sync:
        if info.enabled and parallel == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return nullcontext()
    if parallel == "ddp":
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out as the FSDP2 parameter ``like`` (or ``full`` itself)."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full


@contextmanager
def destroy_on_exit(info: DistInfo):
    try:
        yield
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
