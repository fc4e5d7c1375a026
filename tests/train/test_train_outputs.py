"""Training CLI outputs: an out_dir that cannot be a directory is one line (exit 2); the captioner's
samples/captions.jsonl has no duplicate steps after a kill and --resume; renames are made durable."""
import json
import shutil
from pathlib import Path

import pytest

from dalle3_fast.train import checkpoint as ckpt
from dalle3_fast.train.__main__ import main

CAPTIONER = {"task": "captioner", "steps": 3, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "sample_every": 1,
             "task_options": {"resolution": 32, "sample_count": 2, "tokenizer_scenes": 40, "sample_tokens": 3}}


def write_config(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize("where", ["file", "dev_null"])
def test_out_dir_that_cannot_be_a_directory_is_one_line(tmp_path, capsys, where):
    config = write_config(tmp_path, {**CAPTIONER, "steps": 1})
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("a file, not a directory")
    else:
        out = Path("/dev/null/run")
    assert main([config, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(out) in err, err


def test_samples_log_has_no_duplicate_steps_after_kill_and_resume(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    config = write_config(tmp_path, CAPTIONER)
    assert main([config, "--out", str(out), "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "samples" / "captions.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2, 3, 3]
    # a kill after step 3's samples were logged but before its checkpoint was committed
    shutil.rmtree(ckpt.list_checkpoints(out / "checkpoints")[-1])
    assert main([config, "--out", str(out), "--no-progress", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "samples" / "captions.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2, 3, 3]
    metrics = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3]


def test_checkpoint_commit_fsyncs_files_and_directories(tmp_path, monkeypatch):
    import os

    import torch

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    root = tmp_path / "checkpoints"
    tmp = ckpt.begin_save(root, 1)
    ckpt.write_rank_files(tmp, 0, torch.device("cpu"))
    ckpt.write_main_files(tmp, model={"w": torch.ones(2)}, ema=None, optimizer={"state": {}, "param_groups": []},
                          task={}, state={"step": 1})
    final = ckpt.commit_save(root, 1, keep=2)
    staged = root / ".tmp-step_00000001"
    assert str(staged / "model.safetensors") in synced and str(staged) in synced  # contents before the rename
    assert str(root) in synced and final.is_dir()  # the rename itself
