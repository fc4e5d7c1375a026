"""Image (+ caption record) micro-batches for the image tasks, deterministic and resumable.

Two sources, named by the ``data`` option:
- ``"world"``: the procedural scene world, drawn on the fly (sample ``i`` of seed ``s`` is always
  the same picture), so any position is reached without replaying the stream;
- a WebDataset shard spec (``"data/{000000..000099}.tar"``): read in order, sample ``k`` of the
  stream goes to rank ``k % world_size``, shards reshuffled per epoch with a seeded RNG.

Every batch shares one size: ``buckets`` lists the allowed ``[width, height]`` (aspect-ratio
buckets); a world batch picks one with a seeded RNG, a shard sample goes to the bucket nearest its
aspect ratio (resized to cover, centre-cropped) and a batch is emitted when a bucket fills.
Skipping to a resume position reads only image headers.
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image

from dalle3_fast.data.buckets import Bucket, bucket_batches, closest_bucket, image_to_tensor, resize_to_bucket


@dataclass
class ImageDataOptions:
    data: str = "world"                   # "world" or a WebDataset shard spec
    data_seed: int = 0                    # which world / which shard order
    resolution: int = 64                  # square size when no buckets are given
    buckets: list[list[int]] = field(default_factory=list)  # [[width, height], ...]
    # shards only: the member that holds every sample's synthetic caption, e.g. "dsc" as written by
    # ``python -m dalle3_fast.recaption``; the json's caption fields are then ignored and a sample without
    # the member is an error. "": a .dsc/.ssc member where present, else the json's field.
    synthetic_member: str = ""


def bucket_sizes(options: ImageDataOptions, multiple: int = 8) -> list[Bucket]:
    sizes = [tuple(b) for b in options.buckets] or [(options.resolution, options.resolution)]
    for s in sizes:
        if len(s) != 2 or min(s) < multiple or s[0] % multiple or s[1] % multiple:
            raise ValueError(f"task_options.buckets / resolution: size {list(s)} must be [width, height], each a "
                             f"multiple of {multiple} and >= {multiple}")
    return [Bucket(int(w), int(h)) for w, h in sizes]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (for sample grids)."""
    return images.float().add(1).div(2).clamp(0, 1)


def _collate(images: list[Image.Image], records: list[dict]) -> dict:
    return {"image": torch.stack([image_to_tensor(im) for im in images]), "records": records}


def world_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    from dalle3_fast.data.world import world_sample

    sizes = bucket_sizes(options, multiple)
    for m in itertools.count(start):
        g = m * world_size + rank  # global batch number
        bucket = sizes[random.Random(f"{options.data_seed}:bucket:{g}").randrange(len(sizes))]
        w, h = bucket.width, bucket.height
        pairs = [world_sample(options.data_seed, g * batch_size + j, w, h) for j in range(batch_size)]
        yield _collate([im for im, _ in pairs], [rec for _, rec in pairs])


def _shard_records(options: ImageDataOptions, rank: int, world_size: int):
    """(sample, (width, height)) of this rank's share of the endless, per-epoch-shuffled stream."""
    from dalle3_fast.data.shards import expand_shards, iter_samples

    paths = expand_shards(options.data)
    k = 0
    for epoch in itertools.count():
        order = list(paths)
        random.Random(f"{options.data_seed}:epoch:{epoch}").shuffle(order)
        before = k
        for sample, _ in iter_samples(order, decode_image=False):
            if k % world_size == rank:
                with Image.open(io.BytesIO(sample.members[sample.image_extension])) as im:
                    size = im.size  # header only
                yield sample, size
            k += 1
        if k == before:
            raise ValueError(f"task_options.data: the shards {options.data!r} hold no readable sample")


SYNTHETIC_FIELDS = ("ssc", "dsc")


def _record(sample, synthetic_member: str = "") -> dict:
    """The sample's json, plus its caption members: ``.txt`` (alt) and the ``.ssc``/``.dsc`` a recaption job adds.

    With ``synthetic_member`` the json's synthetic captions are dropped and that member alone supplies one.
    """
    record = dict(sample.json() or {})
    text = sample.text("txt")
    if text is not None:
        record.setdefault("alt", text)
    if synthetic_member:
        for field in SYNTHETIC_FIELDS:
            record.pop(field, None)
        synthetic = sample.text(synthetic_member)
        if synthetic is None:
            raise ValueError(f"task_options.synthetic_member: sample {sample.key!r} has no .{synthetic_member} member; "
                             f"recaption the shards first (python -m dalle3_fast.recaption --style "
                             f"{synthetic_member} ...) or set synthetic_member to \"\"")
        record[synthetic_member] = synthetic
    for field in SYNTHETIC_FIELDS:
        synthetic = sample.text(field)
        if synthetic is not None:
            record[field] = synthetic
    record.setdefault("key", sample.key)
    return record


def shard_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    sizes = bucket_sizes(options, multiple)
    assigned = ((closest_bucket(w, h, sizes), sample) for sample, (w, h) in _shard_records(options, rank, world_size))
    for bucket, samples in itertools.islice(bucket_batches(assigned, batch_size, drop_last=True), start, None):
        # batches before ``start`` (resume) were skipped above without decoding an image
        yield _collate([resize_to_bucket(s.image(), bucket) for s in samples],
                       [_record(s, options.synthetic_member) for s in samples])


def image_batches(options: ImageDataOptions, batch_size: int, rank: int, world_size: int, start: int,
                  multiple: int = 8) -> Iterator[dict]:
    """``{"image": (B, 3, H, W) in [-1, 1], "records": [caption record per sample]}`` forever."""
    if options.data == "world":
        if options.synthetic_member:
            raise ValueError(f"task_options.synthetic_member={options.synthetic_member!r} reads a shard member, but "
                             "data is \"world\"; write and recaption shards (python -m dalle3_fast.recaption) and "
                             "point task_options.data at them, or set synthetic_member to \"\"")
        return world_batches(options, batch_size, rank, world_size, start, multiple)
    return shard_batches(options, batch_size, rank, world_size, start, multiple)


def world_captions(seed: int, count: int) -> list[str]:
    """Captions of all three styles for ``count`` world scenes (tokenizer training text)."""
    from dalle3_fast.data.world import captions, sample_scene, scene_seed

    out = []
    for i in range(count):
        s = scene_seed(seed, i)
        out.extend(captions(sample_scene(s), s).values())
    return out
