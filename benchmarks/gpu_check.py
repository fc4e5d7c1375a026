"""One prepared GPU verification run: build, check, sanitize and time dalle3_fast on an NVIDIA GPU.

    python benchmarks/gpu_check.py [--out FILE] [--budget-s 540]      # make gpu-check
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.json     # CPU: the plumbing only

Stages, in this order, each in child processes with its own time budget (a stage that finishes
early passes its spare time on), the JSON rewritten after each so a stopped run keeps what it had:
  build      the extension in place, CUDA for this GPU's arch only (TORCH_CUDA_ARCH_LIST), MAX_JOBS = cores
  spot       each op on the cuda and triton backends at SD shapes (bf16, fp16; length-0 and long-L keys),
             forward and gradients, against the float64 reference
  tests      pytest -m gpu, then the op test files (on a GPU they run the cuda and triton backends on CUDA)
  sanitizer  compute-sanitizer --tool memcheck on a small run of each CUDA kernel, forward and backward
  bench      ops vs eager, torch.compile and SDPA's backends (bf16), an SD1.5-sized U-Net step, the 2-step decoder
  cpu        on an AVX-512 host CPU only (the dev and CI machines are AVX2): our CPU ops, the dispatcher's default
             path, vs eager GroupNorm+SiLU and SDPA at the tiny U-Net's and SD1.5's shapes (then SDXL's), fp32
             and bf16, 1 thread (thread CPU time) then 2 (wall); rows with the ISA and thread count; reported only

The run fails (exit 1) when a build, test, spot-check or sanitizer check fails, times out or could not run,
or a benchmark child crashes; performance goals are reported beside the figures, never failing. The tree
is put first on PYTHONPATH, so it runs without installing the package (diffusers, webdataset, fastapi may
be missing).
With --dry-run every stage runs with CPU stand-ins: the build prints its command, the tests run a
tiny selection, the sanitizer prints its commands and runs each snippet on the CPU backend, and
the benchmarks run every function at tiny shapes once; the cpu stage runs at the tiny U-Net's shapes
whatever the ISA (its rows say which).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_isa  # noqa: E402
import gpu_check_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
# Nominal seconds per stage for the 540 s default (build ~3 min, tests ~2, sanitizer ~1, benchmarks ~2, CPU ops
# ~1; the cpu stage also gets whatever the stages before it left unused). The device's commands may run 600 s.
SHARES = {"build": 170, "spot": 25, "tests": 110, "sanitizer": 55, "bench": 120, "cpu": 60}
DEFAULT_BUDGET_S = sum(SHARES.values())
MIN_STAGE_S = 10  # a stage with less left than this is not started
# The op test files: on a GPU their backend fixtures run cuda and triton on CUDA tensors.
OP_TEST_FILES = ("tests/ops/test_ops.py", "tests/ops/test_triton_specific.py", "tests/ops/test_ops_errors.py",
                 "tests/ops/test_ops_compile.py", "tests/ops/test_ops_padding.py")
# Covered by the build stage (and CI, which has nvcc and triton's compiler but no GPU); minutes long.
OP_TEST_DESELECT = ("tests/ops/test_triton_specific.py::test_kernels_compile_for_sm90_without_spills",)
DRY_RUN_TESTS = ("tests/ops/test_ops.py::test_default_scale_is_inverse_sqrt_head_dim",)


class UsageError(Exception):
    pass


# ------------------------------------------------------------------ small helpers


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def arch_for_capability(major: int, minor: int) -> str:
    """TORCH_CUDA_ARCH_LIST entry for a device: Hopper gets sm_90a (wgmma, setmaxnreg), others their plain arch."""
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def stage_budgets(budget_s: float) -> dict[str, float]:
    scale = budget_s / DEFAULT_BUDGET_S
    return {name: share * scale for name, share in SHARES.items()}


def allot(share: float, banked: float, remaining: float) -> float:
    """A stage's seconds: its share plus time earlier stages left unused, never past the run's end."""
    return max(0.0, min(share + max(0.0, banked), remaining))


def child_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # The interpreter's own bin first: ninja installed beside torch there makes the build parallel
    # (without it torch's BuildExtension compiles one file after another).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
        env["OMP_NUM_THREADS"] = "1"  # tiny CPU work: threads only wait for each other on a shared box
    return env


class Log:
    """One log file for every child's output; stage tails are shown when a stage fails."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text)

    def offset(self) -> int:
        return self.path.stat().st_size

    def tail(self, start: int, lines: int = 25) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return [ln[:220] for ln in text.splitlines()[-lines:]]


def run_logged(cmd: list[str], *, env: dict, timeout: float, log: Log, tick=None, cwd=ROOT) -> tuple[int | None, float]:
    """Run cmd with its output appended to the log; (returncode or None on timeout, seconds).

    The child gets its own process group, so a timeout also ends what it started (pytest workers,
    the program under compute-sanitizer).
    """
    log.write(f"\n$ {' '.join(cmd)}\n")
    t0 = time.monotonic()
    with open(log.path, "a") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while True:
            try:
                rc = proc.wait(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
                if time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = None
                    break
    seconds = time.monotonic() - t0
    log.write(f"[exit {'timeout' if rc is None else rc} after {seconds:.1f} s]\n")
    return rc, seconds


# ------------------------------------------------------------------ environment


def tool_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unreadable: {exc}"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    release = [ln for ln in lines if "release" in ln]  # nvcc: "Cuda compilation tools, release 13.0, V13.0.88"
    return (release or lines or [""])[-1]


def describe_environment(args) -> dict:
    """Device, versions and tools; the parent imports torch only, never dalle3_fast (the build replaces it)."""
    import torch

    env = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "nvcc": tool_version(["nvcc", "--version"]),
        "ninja": tool_version([os.path.join(os.path.dirname(sys.executable), "ninja"), "--version"])
        or tool_version(["ninja", "--version"]),
        "compute_sanitizer": shutil.which("compute-sanitizer"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal: the triton backend is then not live
        env["triton"] = f"not importable: {type(exc).__name__}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   multiprocessors=props.multi_processor_count, memory_GiB=round(props.total_memory / 2**30, 1))
        smi = tool_version(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                            "--format=csv,noheader"])
        env["nvidia_smi"] = smi
    return env


# ------------------------------------------------------------------ stages


class Run:
    """The state of one gpu_check run, rewritten to args.out after every change that matters."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.rows_path = self.out.with_suffix(".rows.jsonl")
        self.log = Log(self.out.with_suffix(".log"))
        if self.rows_path.exists():
            self.rows_path.unlink()
        self.env = child_env(args.dry_run)
        self.state: dict = {
            "schema": 1,
            "dry_run": args.dry_run,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "out": str(self.out),
            "log": str(self.log.path),
            "budget_s": args.budget_s,
            "stages": {},
            "goals": [],
            "failed": [],
        }

    def save(self) -> None:
        bench = self.state["stages"].get("bench")
        if bench is not None:
            self.state["goals"] = report.evaluate_goals(bench.get("rows", []))
        self.state["failed"] = report.failed_checks(self.state["stages"])
        report.write_json_atomic(self.out, self.state)

    def say(self, text: str) -> None:
        print(f"[gpu_check] {text}", flush=True)

    def python(self, *script_args: str) -> list[str]:
        return [sys.executable, *script_args]

    # -------------------------------------------------------------- build

    def build(self, budget: float) -> dict:
        a = self.args
        cmd = self.python("setup.py", "build_ext", "--inplace")
        build_env = {"TORCH_CUDA_ARCH_LIST": a.arch, "MAX_JOBS": str(a.jobs), "DALLE3_FAST_FORCE_CUDA": "1"}
        shown = " ".join(f"{k}={v}" for k, v in build_env.items()) + " " + " ".join(cmd)
        st = {"command": shown, "arch": a.arch, "max_jobs": a.jobs}
        if a.dry_run:
            self.say(f"build (dry run): would run `{shown}`")
            return {**st, "status": "skip", "note": f"dry run: would run {shown}"}
        if a.skip_build:
            st.update(status="skip", note="--skip-build: using the extension already built in the tree")
        else:
            self.say(f"build: {shown}")
            rc, seconds = run_logged(cmd, env={**self.env, **build_env}, timeout=budget, log=self.log)
            st["build_seconds"] = round(seconds, 1)
            if rc != 0:
                what = "timed out" if rc is None else f"exited {rc}"
                return {**st, "status": "timeout" if rc is None else "fail",
                        "note": f"setup.py build_ext {what} after {seconds:.0f} s; see the log"}
            st.update(status="ok", note=f"built in {seconds:.0f} s for {a.arch} with {a.jobs} jobs")
        probe = ("import dalle3_fast.ops as o, dalle3_fast._native as n; live = o.available_backends(); "
                 "print('LIVE', ','.join(live)); "
                 "[print('NOT', b, n.why_not(b)) for b in ('cuda', 'triton') if b not in live]")
        rc, _ = run_logged(self.python("-c", probe), env=self.env, timeout=120, log=self.log)
        live = self._probe_output()
        st["live_backends"] = live
        if rc != 0 or "cuda" not in live:
            st.update(status="fail", note=f"the extension does not load with CUDA kernels (live: {live}); see the log")
        elif "triton" not in live:
            st["note"] += "; triton backend not live"
        return st

    def _probe_output(self) -> list[str]:
        text = self.log.path.read_text(errors="replace")
        found = re.findall(r"^LIVE (.*)$", text, flags=re.M)
        return found[-1].split(",") if found else []

    # -------------------------------------------------------------- spot check and benchmarks (child + rows)

    def _rows_stage(self, stage: str, cmd: list[str], budget: float) -> dict:
        st: dict = {"rows": []}
        self.state["stages"][stage] = {**st, "status": "running", "budget_s": round(budget)}

        def tick():
            self.state["stages"][stage]["rows"] = [r for r in report.read_rows(self.rows_path, stage)
                                                  if r.get("kind") == "row"]
            self.save()

        rc, seconds = run_logged(cmd, env=self.env, timeout=budget, log=self.log, tick=tick)
        rows = report.read_rows(self.rows_path, stage)
        st["rows"] = [r for r in rows if r.get("kind") == "row"]
        for r in rows:
            if r.get("kind") == "limits":
                st["limits"] = {k: v for k, v in r.items() if k not in ("stage", "kind")}
        st["seconds"] = round(seconds, 1)
        if rc is None:
            st.update(status="timeout", note=f"stopped at its {budget:.0f} s budget; {len(st['rows'])} rows kept")
        elif rc != 0:
            st.update(status="fail", note=f"the {stage} child exited {rc} ({len(st['rows'])} rows); see the log")
        else:
            st["status"] = "ok"
            st["note"] = f"{len(st['rows'])} rows"
        return st

    def spot(self, budget: float) -> dict:
        deadline = time.time() + budget - 5  # cases not reached by then are reported as such, not killed
        cmd = self.python(str(BENCH_DIR / "gpu_check_cases.py"), "spot", "--rows", str(self.rows_path),
                          "--deadline", f"{deadline:.0f}")
        if self.args.dry_run:
            cmd += ["--device", "cpu"]
        st = self._rows_stage("spot", cmd, budget)
        bad = [r for r in st["rows"] if not r.get("ok")]
        unreached = [r for r in st["rows"] if r.get("skipped")]
        checked = len(st["rows"]) - len(unreached)
        if bad and st["status"] == "ok":
            st["status"] = "fail"
        if st["rows"]:
            st["note"] = (f"{checked - len(bad)}/{checked} within tolerance"
                          + (f"; {len(unreached)} cases not reached in the budget" if unreached else "")
                          + (f"; {st['note']}" if st["status"] in ("timeout", "fail") and not bad else ""))
        return st

    def bench(self, budget: float) -> dict:
        deadline = time.time() + budget - 5
        cmd = self.python(str(BENCH_DIR / "gpu_check_bench.py"), "--rows", str(self.rows_path),
                          "--deadline", f"{deadline:.0f}")
        if self.args.dry_run:
            cmd += ["--tiny"]
        return self._rows_stage("bench", cmd, budget)

    def cpu(self, budget: float) -> dict:
        """Our CPU ops vs eager / SDPA on the host CPU, when it has AVX-512 (or in a dry run, at tiny shapes)."""
        info = cpu_isa.cpu_info()
        host = {"cpu_model": info["model"], "isa": cpu_isa.isa_summary(info),
                "torch_cpu_capability": cpu_isa.torch_cpu_capability()}
        if not info["avx512f"] and not self.args.dry_run:
            return {**host, "status": "skip",
                    "note": f"the host CPU shows no AVX-512 ({host['isa']}); AVX2 is covered by CI's machine class"}
        deadline = time.time() + budget - 5
        cmd = self.python(str(BENCH_DIR / "gpu_check_cpu.py"), "--rows", str(self.rows_path),
                          "--deadline", f"{deadline:.0f}")
        if self.args.dry_run:
            cmd += ["--tiny"]
        st = {**host, **self._rows_stage("cpu", cmd, budget)}
        records = report.read_rows(self.rows_path, "cpu")
        st["limits"] = [{k: v for k, v in r.items() if k not in ("stage", "kind")}
                        for r in records if r.get("kind") == "limits"]
        st["unreached"] = next((r["cases"] for r in records if r.get("kind") == "unreached"), None)
        st["verdict"] = report.cpu_verdict(st["rows"])
        note = report.cpu_verdict_line(st["verdict"])
        if self.args.dry_run:
            note = f"dry run, tiny shapes, {host['isa']}: {note}"
        if st["status"] != "ok":
            note += f"; {st['note']}"
        elif st["unreached"]:
            note += f"; {len(st['unreached'])} shapes not reached in the budget"
        if info["avx512f"] and not host["torch_cpu_capability"].startswith("AVX512"):
            note += f"; the eager peers ran torch's {host['torch_cpu_capability']} kernels, not AVX-512 ones"
        st["note"] = note
        return st

    # -------------------------------------------------------------- tests

    def _pytest(self, name: str, files_and_args: list[str], timeout: float, allow_none: bool) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            cmd = self.python("-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
                              *files_and_args)
            rc, seconds = run_logged(cmd, env=self.env, timeout=timeout, log=self.log)
            counts = parse_junit(junit)
        run = {"name": name, "command": " ".join(cmd[1:]).replace(f"--junitxml={junit} ", ""),
               "rc": rc, "seconds": round(seconds, 1), **counts}
        if rc is None:
            run["status"] = "timeout"
        elif rc == 0 or (rc == 5 and allow_none):  # 5: no test selected
            run["status"] = "ok"
        else:
            run["status"] = "fail"
        return run

    def tests(self, budget: float) -> dict:
        t_end = time.monotonic() + budget
        gpu_files = marked_gpu_files()
        runs = []
        if gpu_files:
            runs.append(self._pytest("pytest -m gpu", ["-m", "gpu", *gpu_files], t_end - time.monotonic(),
                                     allow_none=True))
        else:
            runs.append({"name": "pytest -m gpu", "status": "ok", "note": "no test in tests/ is marked gpu"})
        if self.args.dry_run:
            runs.append(self._pytest("op tests", list(DRY_RUN_TESTS), t_end - time.monotonic(), allow_none=False))
        else:
            # The CUDA (and CPU) backends first: no JIT compilation, so their verdict comes within seconds;
            # then Triton's, which compiles and autotunes each kernel variant (pytest-xdist spreads that).
            common = [*OP_TEST_FILES, *(f"--deselect={d}" for d in OP_TEST_DESELECT)]
            workers = xdist_workers(self.args.jobs)
            parallel = ["-n", str(workers)] if workers else []
            for name, keyword in (("op tests, cuda/cpu backends", "not triton"), ("op tests, triton backend", "triton")):
                left = t_end - time.monotonic()
                if left < 5:
                    runs.append({"name": name, "status": "not-run", "note": "no time left in the stage budget"})
                    continue
                runs.append(self._pytest(name, [*common, "-k", keyword, *parallel], left, allow_none=False))
        statuses = [r["status"] for r in runs]
        status = ("fail" if "fail" in statuses else "timeout" if "timeout" in statuses
                  else "not-run" if "not-run" in statuses else "ok")
        passed = sum(r.get("passed", 0) for r in runs)
        failed = sum(r.get("failed", 0) + r.get("errors", 0) for r in runs)
        skipped = sum(r.get("skipped", 0) for r in runs)
        note = f"{passed} passed, {failed} failed, {skipped} skipped"
        if status == "timeout":
            note += "; stopped at the budget"
        return {"status": status, "note": note, "runs": runs}

    # -------------------------------------------------------------- sanitizer

    def sanitizer(self, budget: float) -> dict:
        import gpu_check_cases as cases  # noqa: PLC0415  (light: imports torch lazily)

        commands = sanitizer_commands(sys.executable, cases.SANITIZE_CASES)
        names = list(cases.SANITIZE_CASES)
        st: dict = {"commands": {n: " ".join(c) for n, c in commands.items()}}
        if self.args.dry_run:
            for c in commands.values():
                self.say(f"sanitizer (dry run): would run `{' '.join(c)}`")
            # The snippets themselves run on the CPU backend, without the sanitizer, in one process.
            cmd = self.python(str(BENCH_DIR / "gpu_check_cases.py"), "sanitize", *names, "--device", "cpu")
            rc, seconds = run_logged(cmd, env=self.env, timeout=budget, log=self.log)
            ok = rc == 0
            st["cases"] = [{"name": n, "status": "ok" if ok else "fail", "errors": None} for n in commands]
            return {**st, "status": "ok" if ok else ("timeout" if rc is None else "fail"),
                    "note": f"dry run: {len(names)} snippets ran on the CPU backend" + ("" if ok else f"; exit {rc}")}
        if shutil.which("compute-sanitizer") is None:
            return {**st, "status": "skip", "note": "compute-sanitizer is not on PATH: memcheck not run"}
        live = self.state["stages"].get("build", {}).get("live_backends")
        if live is not None and "cuda" not in live:
            return {**st, "status": "skip", "note": "no live CUDA kernels to check (see the build stage)"}
        env = {**self.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # every tensor its own allocation: exact bounds
        from concurrent.futures import ThreadPoolExecutor

        t_end = time.monotonic() + budget
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_sanitizer_"))

        def one(key):  # each run logs to its own file (they run in parallel), appended to the log after
            case_log = Log(tmp / f"{key.replace(':', '_')}.log")
            rc, seconds = run_logged(commands[key], env=env, timeout=max(1.0, t_end - time.monotonic()),
                                     log=case_log)
            return key, rc, seconds, case_log.path.read_text(errors="replace")

        results = []
        with ThreadPoolExecutor(max_workers=min(len(commands), max(1, self.args.jobs // 2))) as pool:
            for key, rc, seconds, text in pool.map(one, commands):
                self.log.write(text)
                results.append(classify_sanitizer(key, rc, seconds, text))
        shutil.rmtree(tmp, ignore_errors=True)
        st["cases"] = results
        statuses = [r["status"] for r in results]
        status = ("fail" if "fail" in statuses else "timeout" if "timeout" in statuses
                  else "skip" if all(s == "skip" for s in statuses) else "ok")
        bad = [f"{r['name']}: {r['status']}" for r in results if r["status"] != "ok"]
        return {**st, "status": status, "note": f"{statuses.count('ok')}/{len(results)} clean"
                + (f"; {', '.join(bad)}" if bad else "")}


# racecheck (shared-memory hazards) on the kernels that stage tiles in shared memory; only our kernels.
RACECHECK_CASES = ("gn_fused", "gn_channels_last", "attention_tc", "cross_attention_tc")


def sanitizer_commands(python: str, cases) -> dict[str, list[str]]:
    """'tool:case' -> command. memcheck checks every kernel of each case's run; racecheck ours only."""
    # --report-api-errors no: API calls that return an error (torch probes some on purpose) are no memory error.
    base = ["compute-sanitizer", "--report-api-errors", "no", "--error-exitcode", "1", "--print-limit", "20",
            "--launch-timeout", "0"]
    snippet = [python, str(BENCH_DIR / "gpu_check_cases.py"), "sanitize"]
    commands = {f"memcheck:{n}": [*base[:1], "--tool", "memcheck", *base[1:], *snippet, n] for n in cases}
    for n in RACECHECK_CASES:
        commands[f"racecheck:{n}"] = [*base[:1], "--tool", "racecheck", "--kernel-name", "kns=dalle3_fast",
                                      *base[1:], *snippet, n]
    return commands


def classify_sanitizer(key: str, rc, seconds: float, text: str) -> dict:
    """A run is clean when the sanitizer reports 0 errors and the snippet finished (it prints CASE-OK)."""
    name = key.split(":")[-1]
    m = (re.search(r"ERROR SUMMARY: (\d+) error", text)
         or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text))
    errors = int(m.group(1)) if m else None
    finished = f"CASE-OK {name}" in text
    r = {"name": key, "rc": rc, "seconds": round(seconds, 1), "errors": errors}
    if rc is None:
        r.update(status="timeout", note="stopped at the stage budget")
    elif "Device not supported" in text or ("error 999" in text.lower() and not finished):
        r.update(status="skip", note="compute-sanitizer cannot attach to this device/runtime")
    elif rc == 0 and finished and (errors == 0 or errors is None and "racecheck" in key):
        r["status"] = "ok"
    else:
        r.update(status="fail", note=f"exit {rc}, {errors if errors is not None else '?'} sanitizer errors"
                 + ("" if finished else ", the snippet did not finish"))
    return r


def parse_junit(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for s in suites:
        tests, fails, errs, skips = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        counts["failed"] += fails
        counts["errors"] += errs
        counts["skipped"] += skips
        counts["passed"] += tests - fails - errs - skips
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    counts["failures"] = counts["failures"][:40]
    return counts


def marked_gpu_files() -> list[str]:
    """Test files that mark tests with the `gpu` marker (pytest -m gpu imports only these)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text(errors="replace")))


def xdist_workers(jobs: int) -> int:
    """pytest-xdist workers: Triton compiles each kernel variant in one single-threaded process, so the
    Triton tests scale with processes (they share Triton's on-disk cache); 0 without xdist or cores."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    return min(12, jobs - 2) if jobs >= 4 else 0


# ------------------------------------------------------------------ command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="Results: benchmarks/results/<gpu-name>.json (and .log beside it); summary table on stdout. "
               "Exit 0: every check passed; 1: a check failed, timed out or could not run; 2: bad usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="FILE|DIR/",
                   help="where the JSON goes (default benchmarks/results/<gpu-name-slug>.json; with --dry-run a "
                        "temporary file); a directory (an existing one, or a path ending in /) gets "
                        "<gpu-name-slug>.json inside. The log goes beside it as .log, the children's rows as "
                        ".rows.jsonl while a stage runs")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU mode for CI: every stage with CPU stand-ins, no GPU, no CUDA build")
    p.add_argument("--skip-build", action="store_true",
                   help="use the extension already built in the tree (still checks that its CUDA kernels load)")
    p.add_argument("--stages", default=",".join(report.STAGES),
                   help=f"comma-separated subset of {','.join(report.STAGES)} to run, in that order (default: all)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}); shared among the stages as "
                        + ", ".join(f"{k} {v}" for k, v in SHARES.items()) + " at the default, scaled otherwise")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: from the device's compute "
                                  "capability, 9.0a on Hopper; with --dry-run 9.0a)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel compile jobs (MAX_JOBS) and the base for pytest/sanitizer workers (default: cores)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in report.STAGES]
    if unknown or not stages:
        raise UsageError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(report.STAGES)}")
    args.stages = [s for s in report.STAGES if s in stages]
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    return args


def resolve_device_and_paths(args) -> str:
    import torch

    if args.dry_run:
        device = "dry-run-cpu"
        args.arch = args.arch or "9.0a"
        args.out = out_path(args.out, device) if args.out else os.path.join(
            tempfile.mkdtemp(prefix="gpu_check_"), f"{device}.json")
        return device
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device is visible (torch.cuda.is_available() is False, torch "
                         f"{torch.__version__}); run on a GPU machine with a CUDA torch, or use --dry-run")
    device = torch.cuda.get_device_name(0)
    args.arch = args.arch or arch_for_capability(*torch.cuda.get_device_capability(0))
    args.out = out_path(args.out, device) if args.out else str(BENCH_DIR / "results" / f"{slug(device)}.json")
    return device


def out_path(out: str, device: str) -> str:
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, f"{slug(device)}.json")
    return out


def main(argv=None) -> int:
    t_start = time.monotonic()
    try:
        args = parse_args(argv)
        device = resolve_device_and_paths(args)
    except UsageError as exc:
        print(f"gpu_check.py: {exc}", file=sys.stderr)
        return 2
    run = Run(args)
    run.state["device"] = device
    run.state["env"] = describe_environment(args)
    run.say(f"{device}; arch {args.arch}; budget {args.budget_s:.0f} s; stages {','.join(args.stages)}; "
            f"results -> {run.out}")
    for name in report.STAGES:
        if name not in args.stages:
            run.state["stages"][name] = {"status": "skip", "note": "not in --stages"}
    run.save()

    shares = stage_budgets(args.budget_s)
    banked = 0.0
    offsets = {}
    for name in args.stages:
        remaining = args.budget_s - (time.monotonic() - t_start)
        budget = allot(shares[name], banked, remaining)
        if budget < MIN_STAGE_S:
            run.state["stages"][name] = {"status": "not-run", "note": f"only {remaining:.0f} s of the budget left"}
            run.save()
            continue
        run.say(f"{name}: starting (budget {budget:.0f} s)")
        offsets[name] = run.log.offset()
        t0 = time.monotonic()
        try:
            result = getattr(run, name)(budget)
        except Exception as exc:  # a bug in this script must not lose the results so far
            result = {"status": "fail", "note": f"gpu_check.py raised {type(exc).__name__}: {exc}"}
        spent = time.monotonic() - t0
        result.setdefault("seconds", round(spent, 1))
        result["seconds"] = round(spent, 1)
        result["budget_s"] = round(budget)
        run.state["stages"][name] = result
        run.save()
        banked += shares[name] - spent
        run.say(f"{name}: {result['status']} in {spent:.1f} s" + (f" ({result['note']})" if result.get("note") else ""))

    run.state["seconds"] = round(time.monotonic() - t_start, 1)
    run.save()
    for name in args.stages:  # the log's end for each failed stage, before the summary
        st = run.state["stages"][name]
        if st["status"] in ("fail", "timeout") and name in offsets:
            print(f"--- {name}: last lines of its output ({run.log.path}) ---")
            print("\n".join(run.log.tail(offsets[name])))
    print("\n".join(report.summary_lines(run.state)), flush=True)
    if run.rows_path.exists():
        run.rows_path.unlink()  # folded into the JSON
    return 1 if run.state["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
