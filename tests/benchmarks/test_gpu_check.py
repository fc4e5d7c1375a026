"""benchmarks/gpu_check.py without a GPU: the --dry-run runs every stage on CPU stand-ins and writes a JSON
with every stage, benchmark row and goal; the budget, goal and exit-code logic on synthetic inputs."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def run_script(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One whole dry run (about 40 s of CPU: five child processes, tiny models traced by torch.compile)."""
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    proc = run_script("--dry-run", "--out", str(out))
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_and_writes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["failed"] == []
    stages = data["stages"]
    assert list(stages) == ["build", "spot", "tests", "sanitizer", "bench"]
    assert stages["build"]["status"] == "skip"
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in stages["build"]["command"]
    assert "build_ext --inplace" in stages["build"]["command"]
    for name in ("spot", "tests", "sanitizer", "bench"):
        assert stages[name]["status"] == "ok", (name, stages[name])
        assert stages[name]["seconds"] >= 0 and stages[name]["budget_s"] > 0
    assert stages["spot"]["rows"] and all(r["ok"] and r["err"] < r["tol"] for r in stages["spot"]["rows"])
    assert {r["op"] for r in stages["spot"]["rows"]} == {"group_norm_silu", "attention", "cross_attention"}
    op_run = stages["tests"]["runs"][-1]
    assert op_run["status"] == "ok" and op_run["passed"] >= 1 and op_run["failed"] == 0
    cases = stages["sanitizer"]["cases"]
    commands = stages["sanitizer"]["commands"]
    assert {c["name"] for c in cases} == set(commands) and all(c["status"] == "ok" for c in cases)
    memcheck = [k for k in commands if k.startswith("memcheck:")]
    assert len(memcheck) >= 6 and any(k.startswith("racecheck:") for k in commands)
    for key, cmd in commands.items():
        tool, case = key.split(":")
        assert cmd.startswith(f"compute-sanitizer --tool {tool} ") and cmd.endswith(f"sanitize {case}")
        assert "--error-exitcode 1" in cmd
    # Everything the log says went to the log, and the children's rows were folded into the JSON.
    assert Path(data["log"]).exists() and not out.with_suffix(".rows.jsonl").exists()


@pytest.mark.slow
def test_dry_run_has_every_benchmark_row_and_goal(dry_run):
    _, out = dry_run
    data = json.loads(out.read_text())
    bench = data["stages"]["bench"]
    assert bench["limits"]["copy_GBps"] > 0 and bench["limits"]["matmul_TFLOPs"] > 0
    impls = {}
    for r in bench["rows"]:
        impls.setdefault(r["op"], set()).add(r["impl"])
    assert impls["group_norm_silu"] >= {"eager", "torch.compile"}
    for op in ("attention fwd", "attention fwd+bwd"):
        assert impls[op] >= {"eager", "torch.compile", "sdpa"}
    assert impls["cross_attention"] >= {"eager", "torch.compile", "sdpa+mask", "sdpa per-sample"}
    for op in ("unet step", "decoder 2-step"):
        assert impls[op] >= {"ours", "reference", "torch.compile(reference)", "torch.compile(ours)"}
    timed = [r for r in bench["rows"] if r["ms"] is not None]
    assert len(timed) == len(bench["rows"]), [r for r in bench["rows"] if r["ms"] is None]
    gn = [r for r in bench["rows"] if r["op"] == "group_norm_silu"]
    assert all(r["gbps"] > 0 and r["fraction_of_copy"] > 0 for r in gn)
    assert all(r["tflops"] > 0 for r in bench["rows"] if r["op"].startswith(("attention", "cross")))
    goals = {g["name"]: g for g in data["goals"]}
    assert set(goals) == {"gn_bandwidth", "gn_vs_compile", "attention_tflops", "cross_attention_vs_mask",
                          "unet_vs_eager"}
    for name in ("gn_bandwidth", "gn_vs_compile", "cross_attention_vs_mask", "unet_vs_eager"):
        assert goals[name]["cases"] and goals[name]["met"] is not None, goals[name]


@pytest.mark.slow
def test_dry_run_prints_the_summary_last(dry_run):
    proc, out = dry_run
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("RESULT: all checks passed") and str(out) in lines[-1]
    text = proc.stdout
    for word in ("build", "spot", "tests", "sanitizer", "bench", "goals (reported, not failing)"):
        assert word in text


def test_help_names_every_flag():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0
    for flag in ("--out", "--dry-run", "--skip-build", "--stages", "--budget-s", "--arch", "--jobs"):
        assert flag in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--stages", "build,nope"], "--stages: unknown stage(s) nope"),
    (["--dry-run", "--budget-s", "0"], "--budget-s must be > 0"),
])
def test_bad_flags_exit_2_with_one_line(args, message):
    proc = run_script(*args, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: ") and message in lines[0], proc.stderr


def test_stage_subset_marks_the_rest_skipped(tmp_path):
    proc = run_script("--dry-run", "--stages", "build", "--out", f"{tmp_path}/", "--arch", "8.0", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "dry-run-cpu.json"  # a directory gets <device>.json
    stages = json.loads(out.read_text())["stages"]
    assert "TORCH_CUDA_ARCH_LIST=8.0 " in stages["build"]["command"]
    assert all(stages[s]["status"] == "skip" and stages[s]["note"] == "not in --stages"
               for s in ("spot", "tests", "sanitizer", "bench"))


def test_arch_and_budgets(gpu_check):
    assert gpu_check.arch_for_capability(9, 0) == "9.0a"
    assert gpu_check.arch_for_capability(8, 0) == "8.0"
    assert gpu_check.arch_for_capability(8, 9) == "8.9"
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    shares = gpu_check.stage_budgets(gpu_check.DEFAULT_BUDGET_S)
    assert sum(shares.values()) == pytest.approx(480)
    assert gpu_check.stage_budgets(240)["build"] == pytest.approx(shares["build"] / 2)
    assert gpu_check.allot(60, 30, 1000) == 90  # time an earlier stage left unused is passed on
    assert gpu_check.allot(60, -30, 1000) == 60  # an overrun is not taken from later stages
    assert gpu_check.allot(60, 30, 40) == 40  # never past the end of the run


def _row(op, case, impl, ms, goal, **extra):
    return {"kind": "row", "op": op, "case": case, "impl": impl, "ms": ms, "goal": goal, **extra}


def test_goals_pass_and_miss(gpu_check):
    report = gpu_check.report
    rows = [
        _row("group_norm_silu", "big", "torch.compile", 1.0, "gn", fraction_of_copy=0.7),
        _row("group_norm_silu", "big", "ours:cuda", 0.8, "gn", fraction_of_copy=0.9),
        _row("group_norm_silu", "big", "ours:triton", 0.9, "gn", fraction_of_copy=0.8),
        _row("attention fwd", "D64", "ours:triton", 1.0, "attention", tflops=400.0),
        _row("attention fwd", "D64", "ours:cuda", 2.0, "attention", tflops=200.0),
        _row("cross_attention", "x", "sdpa+mask", 3.0, "cross_attention"),
        _row("cross_attention", "x", "sdpa+mask:efficient", 2.0, "cross_attention"),
        _row("cross_attention", "x", "sdpa per-sample", 0.1, "cross_attention"),
        _row("cross_attention", "x", "ours:cuda", 1.0, "cross_attention"),
        _row("unet step", "sd15", "ours", 10.0, "unet"),
        _row("unet step", "sd15", "reference", 25.0, "unet"),
    ]
    goals = {g["name"]: g for g in report.evaluate_goals(rows)}
    assert goals["gn_bandwidth"]["met"] is True and goals["gn_bandwidth"]["cases"][0]["impl"] == "ours:cuda"
    assert goals["gn_vs_compile"]["met"] is True
    assert goals["attention_tflops"]["met"] is False  # 400 < 450
    # 2.0 / 1.0: against the fastest masked SDPA, not the default one; the padding-free loop is no mask
    assert goals["cross_attention_vs_mask"]["met"] is True
    assert "sdpa+mask:efficient" in goals["cross_attention_vs_mask"]["cases"][0]["measured"]
    assert goals["unet_vs_eager"]["met"] is True
    rows[-1]["ms"] = 15.0
    assert {g["name"]: g for g in report.evaluate_goals(rows)}["unet_vs_eager"]["met"] is False
    rows[1]["ms"] = rows[2]["ms"] = None  # our kernels failed to time: unmeasured, never "met"
    gn = {g["name"]: g for g in report.evaluate_goals(rows)}["gn_bandwidth"]
    assert gn["met"] is None and gn["cases"][0]["measured"] is None


def test_failed_checks_decide_the_exit_code(gpu_check):
    report = gpu_check.report
    ok = {s: {"status": "ok"} for s in report.STAGES}
    assert report.failed_checks(ok) == []
    skipped_sanitizer = {**ok, "sanitizer": {"status": "skip", "note": "compute-sanitizer is not on PATH"}}
    assert report.failed_checks(skipped_sanitizer) == []
    for status in ("fail", "timeout", "not-run"):
        assert report.failed_checks({**ok, "tests": {"status": status, "note": "x"}}) == [f"tests: {status} (x)"]
    assert report.failed_checks({**ok, "bench": {"status": "timeout"}}) == []  # goals are not checks
    assert report.failed_checks({**ok, "bench": {"status": "fail", "note": "crash"}}) == ["bench: fail (crash)"]


def test_sanitizer_output_is_classified(gpu_check):
    classify = gpu_check.classify_sanitizer
    clean = "CASE-OK gn_fused (cuda backend on cuda:0)\n========= ERROR SUMMARY: 0 errors\n"
    assert classify("memcheck:gn_fused", 0, 1.0, clean)["status"] == "ok"
    dirty = "========= Invalid __global__ write of size 4 bytes\nCASE-OK gn_fused\n========= ERROR SUMMARY: 3 errors\n"
    r = classify("memcheck:gn_fused", 1, 1.0, dirty)
    assert r["status"] == "fail" and r["errors"] == 3
    crashed = "RuntimeError: CUDA error: an illegal memory access\n========= ERROR SUMMARY: 0 errors\n"
    assert classify("memcheck:gn_fused", 1, 1.0, crashed)["status"] == "fail"
    unsupported = "========= Error: Device not supported\n"
    assert classify("memcheck:gn_fused", 1, 1.0, unsupported)["status"] == "skip"
    assert classify("memcheck:gn_fused", None, 60.0, "")["status"] == "timeout"
    race = "CASE-OK attention_tc\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    r = classify("racecheck:attention_tc", 1, 1.0, race)
    assert r["status"] == "fail" and r["errors"] == 2
    quiet = "CASE-OK attention_tc\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert classify("racecheck:attention_tc", 0, 1.0, quiet)["status"] == "ok"


def test_rows_file_tolerates_a_torn_last_line(gpu_check, tmp_path):
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"stage": "bench", "kind": "row", "op": "a"}) + "\n"
                    + json.dumps({"stage": "spot", "kind": "row"}) + "\n" + '{"stage": "bench", "ki')
    assert gpu_check.report.read_rows(rows, "bench") == [{"stage": "bench", "kind": "row", "op": "a"}]


def _run_obj(gpu_check, tmp_path, **overrides):
    import argparse

    args = argparse.Namespace(out=str(tmp_path / "x.json"), dry_run=False, skip_build=True, stages=["build"],
                              budget_s=60, arch="9.0a", jobs=2)
    for k, v in overrides.items():
        setattr(args, k, v)
    return gpu_check.Run(args)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU machine has live CUDA kernels")
def test_build_without_live_cuda_kernels_fails(gpu_check, tmp_path):
    """On this CPU-only machine the extension has no live CUDA backend: the build check must say so."""
    run = _run_obj(gpu_check, tmp_path)
    st = run.build(60)
    assert st["status"] == "fail" and "does not load with CUDA kernels" in st["note"]
    assert "reference" in st["live_backends"] and "cuda" not in st["live_backends"]


def test_pytest_runs_are_judged_by_exit_code(gpu_check, tmp_path):
    run = _run_obj(gpu_check, tmp_path)
    ok = run._pytest("one", ["tests/benchmarks/test_gpu_check.py::test_arch_and_budgets"], 120, allow_none=False)
    assert ok["status"] == "ok" and ok["passed"] == 1 and ok["failed"] == 0
    none = run._pytest("none", ["-m", "no_such_marker_anywhere", "tests/benchmarks/test_gpu_check.py"], 120, allow_none=True)
    assert none["status"] == "ok" and none["rc"] == 5
    bad = run._pytest("bad", ["tests/benchmarks/test_gpu_check.py::no_such_test"], 120, allow_none=True)
    assert bad["status"] == "fail"


def test_a_child_past_its_budget_is_stopped(gpu_check, tmp_path):
    log = gpu_check.Log(tmp_path / "t.log")
    rc, seconds = gpu_check.run_logged([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                       env=dict(os.environ), timeout=2, log=log)
    assert rc is None and seconds < 30
    assert "up" in log.path.read_text() and "[exit timeout" in log.path.read_text()
