"""WebDataset shards: round trip, interop with the webdataset package, atomic writes, and a reader that
skips and counts every kind of damage instead of crashing."""
import json
import tarfile

import pytest
from PIL import Image

from dalle3_fast.data.shards import (CorruptSample, ShardStats, ShardWriter, expand_shards, iter_samples,
                                     remove_stale_temp_files, split_member_name)
from dalle3_fast.data.world import world_sample


def write_world_shard(path, start, n, fmt="png"):
    with ShardWriter(path) as w:
        for i in range(start, start + n):
            image, rec = world_sample(0, i)
            w.write(f"{i:09d}", {fmt: image, "txt": rec["alt"], "json": rec})


def test_round_trip_png_and_jpg(tmp_path):
    write_world_shard(tmp_path / "000000.tar", 0, 5, "png")
    write_world_shard(tmp_path / "000001.tar", 5, 5, "jpg")
    stats = ShardStats()
    samples = list(iter_samples(str(tmp_path / "{000000..000001}.tar"), stats))
    assert [s.key for s, _ in samples] == [f"{i:09d}" for i in range(10)]
    assert stats.samples == 10 and stats.shards == 2 and stats.skipped == 0
    for (sample, image), i in zip(samples, range(10)):
        expected, rec = world_sample(0, i)
        assert sample.json() == rec and sample.text() == rec["alt"]
        assert set(sample.members) == {"png" if i < 5 else "jpg", "txt", "json"}
        if i < 5:  # png is lossless
            assert image.tobytes() == expected.tobytes()
        assert image.mode == "RGB" and image.size == (64, 64)


def test_shards_are_byte_identical_and_readable_by_webdataset(tmp_path):
    write_world_shard(tmp_path / "a.tar", 0, 4)
    write_world_shard(tmp_path / "b.tar", 0, 4)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    webdataset = pytest.importorskip("webdataset")
    got = list(webdataset.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(4)]
    assert json.loads(got[0]["json"]) == world_sample(0, 0)[1]


def test_reader_skips_and_counts_corruption(tmp_path):
    write_world_shard(tmp_path / "000000.tar", 0, 6)
    good = (tmp_path / "000000.tar").read_bytes()
    # cut inside a member, and exactly at a 512-byte block boundary (reads as a shorter valid tar)
    (tmp_path / "000001.tar").write_bytes(good[: len(good) // 2 + 100])
    boundary = 512 * ((len(good) // 2) // 512)
    (tmp_path / "000002.tar").write_bytes(good[:boundary])
    (tmp_path / "000003.tar").write_bytes(b"this is not a tar file" * 40)
    image, rec = world_sample(0, 0)
    with ShardWriter(tmp_path / "000004.tar") as w:
        w.write("bad_png", {"png": b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "txt": "x"})
        w.write("no_image", {"txt": "caption without an image"})
        w.write("bad_json", {"png": image, "txt": "y", "json": b"{not json"})
        w.write("ok", {"png": image, "txt": "z", "json": rec})
    stats = ShardStats()
    samples = list(iter_samples(str(tmp_path / "{000000..000005}.tar"), stats))
    by_shard = {}
    for sample, _ in samples:
        by_shard.setdefault(sample.shard.rsplit("/", 1)[-1], []).append(sample)
    full = [f"{i:09d}" for i in range(6)]
    assert [x.key for x in by_shard["000000.tar"]] == full
    # each truncated copy yields a strict prefix of the good shard, never a partial sample
    for name in ("000001.tar", "000002.tar"):
        prefix = [x.key for x in by_shard.get(name, [])]
        assert len(prefix) < 6 and prefix == full[:len(prefix)]
        assert all(x.members.keys() == {"png", "txt", "json"} for x in by_shard.get(name, []))
    assert [x.key for x in by_shard["000004.tar"]] == ["bad_json", "ok"]
    assert stats.missing_shards == 1 and stats.unreadable_shards == 1 and stats.truncated_shards == 2
    assert stats.corrupt_images == 1 and stats.incomplete_samples == 3  # no_image + one per truncation
    assert stats.shards == 4 and stats.samples == len(samples)
    assert len(stats.errors) == stats.missing_shards + stats.unreadable_shards + stats.truncated_shards + \
        stats.corrupt_images + stats.incomplete_samples
    bad_json = next(s for s, _ in samples if s.key == "bad_json")
    with pytest.raises(CorruptSample, match="not valid JSON"):
        bad_json.json()
    assert "skipped" in str(stats)


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "000000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(target) as w:
            w.write("a", {"txt": "hello"})
            raise RuntimeError("killed mid-shard")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    w = ShardWriter(target)
    w.write("a", {"txt": "hello"})
    assert not target.exists()  # nothing visible until close
    temps = list(tmp_path.glob(".000000.tar.*.tmp"))
    assert len(temps) == 1
    w.close()
    assert target.exists() and not list(tmp_path.glob("*.tmp"))
    with tarfile.open(target) as tar:
        assert tar.getnames() == ["a.txt"]
    (tmp_path / ".000000.tar.abc.tmp").write_bytes(b"left by a killed writer")
    assert remove_stale_temp_files(tmp_path, "000000.tar") == 1


def test_writer_rejects_bad_keys_and_values(tmp_path):
    with ShardWriter(tmp_path / "x.tar") as w:
        with pytest.raises(ValueError, match="no '.'"):
            w.write("a.b", {"txt": "x"})
        w.write("a", {"txt": "x"})
        with pytest.raises(ValueError, match="written twice"):
            w.write("a", {"txt": "y"})
        with pytest.raises(ValueError, match="cannot encode"):
            w.write("b", {"txt": 3.5})
        with pytest.raises(ValueError, match="cannot encode an image"):
            w.write("c", {"txt2": Image.new("RGB", (4, 4))})


def test_expand_and_split_names():
    assert expand_shards("d/{000000..000002}.tar") == ["d/000000.tar", "d/000001.tar", "d/000002.tar"]
    assert expand_shards(["a.tar", "b/{1..2}.tar"]) == ["a.tar", "b/1.tar", "b/2.tar"]
    with pytest.raises(ValueError, match="names no shards"):
        expand_shards([])
    assert split_member_name("dir/000001.seg.PNG") == ("dir/000001", "seg.png")
    assert split_member_name("a.b/c.txt") == ("a.b/c", "txt")
