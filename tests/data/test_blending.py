"""Caption blending statistics and reproducibility, rank/worker sharding, and aspect-ratio buckets."""
import math

import pytest
import torch
from PIL import Image

from dalle3_fast.data.blending import BlendedShardDataset, draw_uniform, sample_captions, use_synthetic
from dalle3_fast.data.buckets import (DALLE3_BUCKETS, TINY_BUCKETS, Bucket, BucketBatchSampler, bucket_batches,
                                      closest_bucket, image_to_tensor, resize_to_bucket, scaled_buckets)
from dalle3_fast.data.shards import Sample, ShardStats, ShardWriter, iter_samples
from dalle3_fast.data.world import world_sample

N_SHARDS, PER_SHARD = 4, 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of 64x64 and 96x64 scene-world samples; one sample has no synthetic caption."""
    root = tmp_path_factory.mktemp("blend")
    for s in range(N_SHARDS):
        with ShardWriter(root / f"{s:06d}.tar") as w:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                size = (96, 64) if i % 3 == 0 else (64, 64)
                image, rec = world_sample(0, i, *size)
                if i == 5:
                    rec = {k: v for k, v in rec.items() if k != "dsc"}
                w.write(f"{i:09d}", {"png": image, "txt": rec["alt"], "json": rec})
    return str(root / f"{{000000..{N_SHARDS - 1:06d}}}.tar")


@pytest.mark.parametrize("ratio", [0.95, 0.65])
def test_blend_ratio_is_binomial(ratio):
    n = 20_000
    hits = sum(use_synthetic(0, 0, f"{i:09d}", ratio) for i in range(n))
    sd = math.sqrt(n * ratio * (1 - ratio))
    assert abs(hits - n * ratio) < 4.5 * sd, (hits, n * ratio, sd)


def test_blend_draws_reproducible_and_differ_across_epochs_and_seeds():
    keys = [f"{i:09d}" for i in range(5000)]
    e0 = [use_synthetic(0, 0, k, 0.95) for k in keys]
    assert e0 == [use_synthetic(0, 0, k, 0.95) for k in keys]
    e1 = [use_synthetic(0, 1, k, 0.95) for k in keys]
    s1 = [use_synthetic(1, 0, k, 0.95) for k in keys]
    # independent draws disagree with probability 2 p (1 - p) = 0.095
    for other in (e1, s1):
        changed = sum(a != b for a, b in zip(e0, other)) / len(keys)
        assert 0.07 < changed < 0.12, changed
    u = [draw_uniform(0, 0, k) for k in keys]
    assert min(u) >= 0 and max(u) < 1 and abs(sum(u) / len(u) - 0.5) < 0.02


def test_dataset_blends_per_sample(shards):
    ds = BlendedShardDataset(shards, synthetic_ratio=0.5, seed=3, shuffle_buffer=0, rank=0, world_size=1)
    truth = {}
    for sample, _ in iter_samples(shards):
        truth[sample.key] = sample_captions(sample, "dsc")
    out = list(ds)
    assert len(out) == N_SHARDS * PER_SHARD and ds.missing_synthetic == 1
    expected = {}
    for key, (syn, orig) in truth.items():
        expected[key] = orig if syn is None else (syn if use_synthetic(3, 0, key, 0.5) else orig)
    assert sorted(c for _, c in out) == sorted(expected.values())
    synthetic = sum(c == truth[k][0] for k, c in expected.items())
    assert 0 < synthetic < len(expected)
    ds.set_epoch(1)
    assert sorted(c for _, c in ds) != sorted(c for _, c in out)  # new epoch, new draws
    images = [img for img, _ in out]
    assert {tuple(i.shape) for i in images} == {(3, 64, 64), (3, 64, 96)}
    assert all(i.dtype == torch.float32 and -1 <= i.min() and i.max() <= 1 for i in images)


def test_ssc_field_and_ratio_extremes(shards):
    every = {s.key: sample_captions(s, "ssc") for s, _ in iter_samples(shards)}
    syn = BlendedShardDataset(shards, synthetic_ratio=1.0, caption_field="ssc", shuffle_buffer=0)
    assert sorted(c for _, c in syn) == sorted(s for s, _ in every.values())
    orig = BlendedShardDataset(shards, synthetic_ratio=0.0, shuffle_buffer=0)
    assert sorted(c for _, c in orig) == sorted(o for _, o in every.values())
    with pytest.raises(ValueError, match="synthetic_ratio"):
        BlendedShardDataset(shards, synthetic_ratio=1.5)
    with pytest.raises(ValueError, match="caption_field"):
        BlendedShardDataset(shards, caption_field="alt")


def test_caption_sources_and_corrupt_json():
    assert sample_captions(Sample("k", {"txt": b"web", "dsc": b"long"}), "dsc") == ("long", "web")
    assert sample_captions(Sample("k", {"json": b'{"dsc": "d", "alt": "a"}'}), "dsc") == ("d", "a")
    stats = ShardStats()
    assert sample_captions(Sample("k", {"txt": b"web", "json": b"{bad"}), "ssc", stats) == (None, "web")
    assert stats.corrupt_members == 1 and "not valid JSON" in stats.errors[0]


def test_ranks_and_workers_partition_the_shards(shards):
    ranks = [BlendedShardDataset(shards, rank=r, world_size=2, seed=1) for r in range(2)]
    mine = [set(d.my_shards()) for d in ranks]
    assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == N_SHARDS
    # all ranks agree on the shuffled order, which changes with the epoch
    orders = []
    for epoch in range(4):
        for d in ranks:
            d.set_epoch(epoch)
        orders.append(tuple(ranks[0].my_shards() + ranks[1].my_shards()))
    assert len(set(orders)) > 1
    with pytest.raises(ValueError, match="gets no shard"):
        BlendedShardDataset(shards, rank=4, world_size=5).my_shards()
    ds = BlendedShardDataset(shards, rank=0, world_size=1, batch_size=4, drop_last=False, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    batches = list(loader)
    assert sum(len(c) for _, c in batches) == N_SHARDS * PER_SHARD
    for images, captions in batches:
        assert images.shape[0] == len(captions) and images.shape[1] == 3  # one bucket per batch
    single = sorted(c for _, cs in BlendedShardDataset(shards, batch_size=4, drop_last=False) for c in cs)
    assert sorted(c for _, cs in batches for c in cs) == single  # workers split, nothing lost or repeated


def test_buckets_closest_resize_and_scale():
    assert scaled_buckets(DALLE3_BUCKETS, 1 / 16) == (Bucket(64, 64), Bucket(112, 64), Bucket(64, 112))
    assert scaled_buckets(DALLE3_BUCKETS, 0.25, multiple=64) == (Bucket(256, 256), Bucket(448, 256), Bucket(256, 448))
    assert closest_bucket(1920, 1080, DALLE3_BUCKETS) == Bucket(1792, 1024)
    assert closest_bucket(600, 1000, DALLE3_BUCKETS) == Bucket(1024, 1792)
    assert closest_bucket(500, 520, TINY_BUCKETS) == Bucket(64, 64)
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue left edge the centre crop must cut off
    out = resize_to_bucket(image, Bucket(96, 64))
    assert out.size == (96, 64)
    t = image_to_tensor(out)
    assert t.shape == (3, 64, 96) and torch.allclose(t[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None])
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        Bucket.parse("64by64")
    assert Bucket.parse("1792x1024") == Bucket(1792, 1024)


def test_bucket_batch_sampler_and_streaming_batches():
    sizes = [(64, 64)] * 37 + [(100, 60)] * 23 + [(60, 100)] * 11
    sampler = BucketBatchSampler(sizes, TINY_BUCKETS, batch_size=5, seed=0)
    batches = list(sampler)
    assert all(len({closest_bucket(*sizes[i], TINY_BUCKETS) for i in b}) == 1 for b in batches)
    assert all(len(b) == 5 for b in batches) and len(batches) == 7 + 4 + 2
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    per_rank = [list(BucketBatchSampler(sizes, TINY_BUCKETS, 5, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert not {i for b in per_rank[0] for i in b} & {i for b in per_rank[1] for i in b}
    stream = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
    assert list(bucket_batches(stream, 2)) == [("a", [1, 3]), ("b", [2, 5]), ("a", [4])]
    assert list(bucket_batches(stream, 2, drop_last=True)) == [("a", [1, 3]), ("b", [2, 5])]
