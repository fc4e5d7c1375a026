"""Recaption job with a real (tiny, randomly initialised) CoCa: captions land on the right samples,
every original member survives, a kill -9 mid-run followed by a rerun loses and duplicates nothing,
and two torchrun processes split the shards r::2."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dalle3_fast.data.buckets import Bucket, image_to_tensor, resize_to_bucket
from dalle3_fast.data.shards import ShardStats, ShardWriter, iter_samples
from dalle3_fast.data.world import world_sample
from dalle3_fast.models.captioner import CoCa, CoCaConfig
from dalle3_fast.models.tokenizer import SentencePieceTokenizer
from dalle3_fast.recaption import REPORT_DIR, load_captioner, main, recaption

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
TINY = dict(image_size=SIZE, patch_size=8, vision_width=64, vision_layers=1, vision_heads=2, pooler_heads=2,
            caption_queries=8, max_text_len=48, text_width=64, text_heads=2, text_layers=1, multimodal_layers=1,
            embed_dim=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioner")
    tokenizer = SentencePieceTokenizer.train([world_sample(0, i)[1]["dsc"] for i in range(200)], vocab_size=96)
    torch.manual_seed(0)
    CoCa.from_tokenizer(tokenizer, CoCaConfig(**TINY)).save_pretrained(path)
    return path


def write_input(root: Path, n_shards: int, per_shard: int) -> str:
    for s in range(n_shards):
        with ShardWriter(root / f"{s:06d}.tar") as w:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image, rec = world_sample(0, i, SIZE, SIZE)
                w.write(f"{i:09d}", {"png": image, "txt": rec["alt"], "json": rec})
    return str(root / f"{{000000..{n_shards - 1:06d}}}.tar")


def read_all(spec: str):
    stats = ShardStats()
    return {s.key: s for s, _ in iter_samples(spec, stats)}, stats


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return e


def test_recaption_in_process(tmp_path, captioner_dir):
    spec = write_input(tmp_path / "in", 2, 6)
    image, _ = world_sample(0, 99, SIZE, SIZE)
    with ShardWriter(tmp_path / "in" / "000002.tar") as w:  # one undecodable image among good samples
        w.write("broken", {"png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "txt": "x"})
        w.write("fine", {"png": image, "txt": "y"})
        w.write("bad_json", {"png": image, "txt": "z", "json": b"{not json"})
    (tmp_path / "in" / "000003.tar").write_bytes(b"not a tar" * 100)
    shards = [str(tmp_path / "in" / f"{s:06d}.tar") for s in range(5)]  # 000004.tar does not exist
    model = load_captioner(captioner_dir, torch.device("cpu"))
    report = recaption(model, shards, tmp_path / "out", style="dsc", batch_size=4, max_new_tokens=12,
                       update_json=True, progress=False)
    assert report.shards_written == ["000000.tar", "000001.tar", "000002.tar"] and report.captioned == 14
    assert report.stats.corrupt_images == 1 and report.stats.corrupt_members == 1
    assert report.shards_failed == ["000003.tar", "000004.tar"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == report.shards_written  # no empty stand-ins
    inputs, _ = read_all(spec)
    outputs, stats = read_all(str(tmp_path / "out" / "{000000..000002}.tar"))
    assert stats.skipped == 0 and len(outputs) == 14 and "broken" not in outputs
    assert outputs["bad_json"].members["json"] == b"{not json" and outputs["bad_json"].text("dsc")
    # every caption belongs to its own image: redo shard 0's batches by hand
    first = [outputs[f"{i:09d}"] for i in range(6)]
    tensors = torch.stack([image_to_tensor(resize_to_bucket(s.image(), Bucket(SIZE, SIZE))) for s in first])
    expected = model.generate(tensors[:4], max_new_tokens=12) + model.generate(tensors[4:], max_new_tokens=12)
    assert [s.text("dsc") for s in first] == [t.strip() for t in expected]
    for key, original in inputs.items():
        out = outputs[key]
        assert set(out.members) == set(original.members) | {"dsc"}
        assert out.members["png"] == original.members["png"] and out.members["txt"] == original.members["txt"]
        assert out.json() == {**original.json(), "dsc": out.text("dsc")}
    again = recaption(model, shards, tmp_path / "out", batch_size=4, max_new_tokens=12, progress=False)
    assert again.shards_skipped == report.shards_written and again.captioned == 0
    assert again.shards_failed == report.shards_failed  # retried, still bad
    with pytest.raises(ValueError, match="overwrite the input"):
        recaption(model, shards, tmp_path / "in", progress=False)


@pytest.mark.parametrize("method", ["nucleus", "beam"])
def test_sampled_and_beam_decoding_are_reproducible(tmp_path, captioner_dir, method):
    spec = write_input(tmp_path / "in", 1, 5)
    model = load_captioner(captioner_dir, torch.device("cpu"))
    runs = []
    for run in ("a", "b"):
        report = recaption(model, [spec], tmp_path / run, method=method, num_beams=2, batch_size=3,
                           max_new_tokens=10, seed=7, progress=False)
        assert report.captioned == 5
        runs.append((tmp_path / run / "000000.tar").read_bytes())
    assert runs[0] == runs[1]  # nucleus draws are seeded per shard, so a redone shard is the same shard
    captions = [s.text("dsc") for s, _ in iter_samples(str(tmp_path / "a" / "000000.tar"))]
    assert len(captions) == 5 and all(isinstance(c, str) for c in captions)


def test_kill_dash_nine_then_resume(tmp_path, captioner_dir):
    n_shards, per_shard = 6, 6
    spec = write_input(tmp_path / "in", n_shards, per_shard)
    out = tmp_path / "out"
    args = ["--captioner", str(captioner_dir), "--input", spec, "--output", str(out), "--batch-size", "1",
            "--max-tokens", "40", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "dalle3_fast.recaption", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no output shard within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert 1 <= len(finished) < n_shards, finished  # killed mid-run
    assert main(args) == 0  # the rerun, in this process: same code path, one interpreter start less
    report = json.loads((out / REPORT_DIR / "rank-00000-of-00001.json").read_text())
    assert report["shards_skipped"] == finished
    assert sorted(report["shards_skipped"] + report["shards_written"]) == [f"{s:06d}.tar" for s in range(n_shards)]
    keys = [s.key for s, _ in iter_samples(str(out / f"{{000000..{n_shards - 1:06d}}}.tar"))]
    assert len(keys) == n_shards * per_shard and len(set(keys)) == len(keys)
    assert set(keys) == set(read_all(spec)[0])
    assert not list(out.glob(".*.tmp"))


def test_torchrun_two_processes(tmp_path, captioner_dir):
    spec = write_input(tmp_path / "in", 4, 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle3_fast.recaption", "--captioner", str(captioner_dir), "--input", spec, "--output", str(out),
           "--style", "ssc", "--batch-size", "3", "--max-tokens", "8", "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        report = json.loads((out / REPORT_DIR / f"rank-{rank:05d}-of-00002.json").read_text())
        assert report["shards_written"] == [f"{s:06d}.tar" for s in range(rank, 4, 2)]
        assert report["captioned"] == 6
    outputs, stats = read_all(str(out / "{000000..000003}.tar"))
    assert len(outputs) == 12 and stats.skipped == 0
    assert all(s.text("ssc") is not None and "dsc" not in s.members for s in outputs.values())


def test_cli_errors_are_one_line(tmp_path, capsys):
    spec = write_input(tmp_path / "in", 1, 1)
    assert main(["--captioner", str(tmp_path / "nope"), "--input", spec, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err
    assert main(["--captioner", str(tmp_path), "--input", str(tmp_path / "missing_{0..3}.tar"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "none of its 4 shards exist" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recaption_bf16_on_gpu(tmp_path, captioner_dir):
    spec = write_input(tmp_path / "in", 1, 8)
    model = load_captioner(captioner_dir, torch.device("cuda"))
    report = recaption(model, [spec], tmp_path / "out", batch_size=8, max_new_tokens=16, dtype=torch.bfloat16,
                       progress=False)
    assert report.captioned == 8
    outputs, _ = read_all(str(tmp_path / "out" / "000000.tar"))
    assert all(s.text("dsc") for s in outputs.values())


def test_prefetch_keeps_order_and_reraises():
    from dalle3_fast.recaption import _prefetch

    assert list(_prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise KeyError("decoder died")

    with pytest.raises(KeyError, match="decoder died"):
        list(_prefetch(failing()))


@pytest.mark.parametrize("style", ["dsc", "ssc"])
def test_default_captioner_is_the_embedded_one_of_the_style(tmp_path, style):
    from dalle3_fast.data.world import parse_caption

    spec = write_input(tmp_path / "in", 1, 3)  # 32x32 images; the captioner resizes them to its 64
    assert main(["--input", spec, "--output", str(tmp_path / "out"), "--style", style]) == 0
    samples, _ = read_all(str(tmp_path / "out" / "000000.tar"))
    captions = [s.text(style) for s in samples.values()]
    assert len(captions) == 3
    groups = [parse_caption(c).groups() for c in captions]
    if style == "ssc":  # the SSC captioner names the main subject only
        assert all(len(g) == 1 and len(c.split()) < 12 for g, c in zip(groups, captions)), captions
    else:  # the DSC one also writes the background
        assert all(g and parse_caption(c).background for g, c in zip(groups, captions)), captions
