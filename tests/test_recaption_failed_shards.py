"""Recaption: a truncated input shard is a failed shard (no output, non-zero exit, retried once repaired),
and skipped/failed shards and samples are named on stderr and kept in a per-run history."""
import json
import re

import pytest

from dalle3_fast.data.shards import ShardWriter, iter_samples
from dalle3_fast.data.world import world_sample
from dalle3_fast.recaption import REPORT_DIR, _build_parser, main
from test_recaption import SIZE, captioner_dir  # noqa: F401  (the same tiny captioner, a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_shard(path, first, count, broken=False):
    with ShardWriter(path) as w:
        for i in range(first, first + count):
            image, rec = world_sample(0, i, SIZE, SIZE)
            w.write(f"{i:09d}", {"png": image, "txt": rec["alt"]})
        if broken:
            w.write("broken", {"png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "txt": "x"})


def test_truncated_shard_fails_and_is_retried_once_repaired(tmp_path, captioner_dir, capsys):
    write_shard(tmp_path / "in" / "000000.tar", 0, 4, broken=True)
    write_shard(tmp_path / "in" / "000001.tar", 4, 4)
    good = (tmp_path / "in" / "000001.tar").read_bytes()
    (tmp_path / "in" / "000001.tar").write_bytes(good[: int(len(good) * 0.6)])  # cut inside a later sample
    out = tmp_path / "out"
    args = ["--captioner", str(captioner_dir), "--input", str(tmp_path / "in" / "{000000..000001}.tar"),
            "--output", str(out), "--batch-size", "2", "--max-tokens", "6", "--no-progress"]

    assert main(args) == 1  # some shards failed
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failed_line = next(line for line in err.splitlines() if re.search(r"\d+ shards? failed", line))
    assert "000001.tar" in failed_line and "truncated" in failed_line
    skipped_line = next(line for line in err.splitlines() if re.search(r"\d+ samples? skipped", line))
    assert "000000.tar" in skipped_line and "broken" in skipped_line
    assert not (out / "000001.tar").exists() and (out / "000000.tar").exists()
    first = json.loads((out / REPORT_DIR / "rank-00000-of-00001.json").read_text())
    assert first["shards_failed"] == ["000001.tar"] and first["shards_written"] == ["000000.tar"]
    assert first["samples_skipped_count"] == 1 and "broken" in first["samples_skipped"][0]
    assert first["captioned"] == 4  # the truncated shard's samples are not counted: they were not kept

    (tmp_path / "in" / "000001.tar").write_bytes(good)  # repaired
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "already done" in err and "000000.tar" in err
    assert sorted(s.key for s, _ in iter_samples(str(out / "000001.tar"))) == [f"{i:09d}" for i in range(4, 8)]
    history = [json.loads(line) for line in
               (out / REPORT_DIR / "history-rank-00000-of-00001.jsonl").read_text().splitlines()]
    assert [run["shards_failed"] for run in history] == [["000001.tar"], []]
    assert [run["shards_written"] for run in history] == [["000000.tar"], ["000001.tar"]]
    assert all(run["started"] for run in history) and history[1]["samples_skipped_count"] == 0


def test_many_failures_are_named_first_few_plus_count(tmp_path, captioner_dir, capsys):
    write_shard(tmp_path / "in" / "000000.tar", 0, 1)
    args = ["--captioner", str(captioner_dir), "--input", str(tmp_path / "in" / "{000000..000009}.tar"),
            "--output", str(tmp_path / "out"), "--max-tokens", "4", "--no-progress"]
    assert main(args) == 1
    failed_line = next(line for line in capsys.readouterr().err.splitlines() if re.search(r"\d+ shards? failed", line))
    assert "9 shards failed" in failed_line and "000001.tar" in failed_line and "more" in failed_line
    assert "000009.tar" not in failed_line


def test_help_documents_the_exit_status():
    text = _build_parser().format_help()
    assert "exit status" in text.lower() and "1" in text and "2" in text
