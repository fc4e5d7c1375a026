"""benchmarks/run.py's model suites and benchmarks/cpu_policy_table.py, run as a user would at a tiny budget.

No speed is asserted: these check that the commands run, write what they say and refuse bad flags.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def _run(*argv, timeout=600):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def model_suites(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import model_suites

    return model_suites


def test_busy_processes_spin_inside_the_block_and_are_reaped_after(model_suites, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(model_suites.subprocess, "Popen", popen)
    with model_suites.busy_processes(2):
        assert len(started) == 2
        assert all(p.poll() is None for p in started)
        t0 = time.process_time()
        time.sleep(0.2)
        assert time.process_time() - t0 < 0.1  # they spin in their own processes, not in ours
    assert all(p.poll() is not None for p in started)
    with model_suites.busy_processes(0):
        assert len(started) == 2


@pytest.mark.parametrize("value", ["two", "1,-1", ""])
def test_busy_flag_refuses_bad_counts(value):
    proc = _run(BENCHMARKS / "run.py", "--suite", "pipeline", "--busy", value, timeout=120)
    assert proc.returncode == 2
    assert "--busy" in proc.stderr


def test_cpu_shapes_flag_refuses_an_unknown_unet():
    proc = _run(BENCHMARKS / "run.py", "--suite", "ops", "--cpu-shapes", "tiny,sd21", timeout=120)
    assert proc.returncode == 2
    assert "--cpu-shapes takes some of sd15,tiny,sdxl, not 'sd21'" in proc.stderr


def test_pipeline_suite_times_quiet_and_busy_rows(model_suites, monkeypatch):
    """The suite's own code at 2 prompts and 1 step (the real one is 16 x 20)."""
    import run

    monkeypatch.setattr(model_suites, "PIPELINE_PROMPTS", 2)
    monkeypatch.setattr(model_suites, "PIPELINE_STEPS", 1)
    bench = run.Bench(torch.device("cpu"), warmup=0, iters=1)
    model_suites.suite_pipeline(run.parse_args(["--suite", "pipeline", "--no-onnx", "--busy", "0,1"]), bench)
    rows = {(r.shape, r.impl): r for r in bench.rows}
    assert {impl for _, impl in rows} == {"reference backend", "ours"}
    assert sorted(shape for shape, impl in rows if impl == "ours") == [
        "tiny pipeline, 2 prompts 64x64, 1 steps, CFG 5", "tiny pipeline, 2 prompts 64x64, 1 steps, CFG 5, 1 busy processes"]
    assert all(r.ms > 0 and "images/s" in r.note for r in rows.values())


def test_busy_processes_stop_when_their_parent_dies(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(BENCHMARKS)!r})\nimport model_suites\n"
                      "with model_suites.busy_processes(1):\n    print(flush=True)\n    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    parent.stdout.readline()
    children = [int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert len(children) == 1
    parent.kill()  # no finally runs: the child must notice by itself
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{children[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{children[0]}").exists()


def test_cpu_policy_table_merges_rows_and_refreshes_the_policy_column(tmp_path):
    from dalle3_fast.ops import cpu_policy

    table = tmp_path / "table.json"
    stale = {"op": "group_norm_silu", "net": "x", "shape": [2, 64, 16, 16], "groups": 16, "silu": True, "add": False,
             "dtype": "float32", "threads": 1, "backward": False, "cpu_ms": 1.0, "reference_ms": 1.0,
             "policy": "not a path"}
    table.write_text(json.dumps({"what": "test", "rows": [stale]}))
    proc = _run(BENCHMARKS / "cpu_policy_table.py", "--ops", "group_norm_silu", "--nets", "tiny_b32_8x8",
                "--layout", "channels_last", "--no-backward", "--repeats", "1", "--update", table)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(table.read_text())["rows"]
    assert rows[0]["shape"] == stale["shape"] and rows[0]["policy"] == "cpu"  # kept, column refreshed
    new = rows[1:]
    assert len(new) == 11 and {r["layout"] for r in new} == {"channels_last"}
    for r in new:
        assert r["cpu_ms"] > 0 and r["reference_ms"] > 0
        assert r["policy"] == ("cpu" if cpu_policy.row_prefers_kernel(r) else "reference")


def test_cpu_policy_table_refuses_an_unknown_op():
    proc = _run(BENCHMARKS / "cpu_policy_table.py", "--ops", "conv", timeout=120)
    assert proc.returncode == 2 and "unknown op 'conv'" in proc.stderr
