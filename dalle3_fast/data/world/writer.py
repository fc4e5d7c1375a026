"""Writing scene-world shards; importable by spawned pool workers (``__main__`` is not)."""
from __future__ import annotations

from pathlib import Path

from ..shards import ShardWriter, remove_stale_temp_files
from .samples import world_sample


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


_progress = None  # a shared counter of samples written, set in pool workers


def init_worker(counter) -> None:
    global _progress
    _progress = counter


def write_shard(out: str, index: int, start: int, stop: int, seed: int, width: int, height: int,
                image_format: str, on_sample=None) -> int:
    """Write samples [start, stop) as shard ``index``; returns the sample count."""
    remove_stale_temp_files(out, shard_name(index))
    with ShardWriter(Path(out) / shard_name(index)) as writer:
        for i in range(start, stop):
            image, record = world_sample(seed, i, width, height)
            writer.write(f"{i:09d}", {image_format: image, "txt": record["alt"], "json": record})
            if on_sample is not None:
                on_sample()
    return stop - start


def _count_sample() -> None:
    with _progress.get_lock():
        _progress.value += 1


def write_shard_job(args) -> int:
    return write_shard(*args, on_sample=_count_sample)
