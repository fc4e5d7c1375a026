"""The result file of benchmarks/gpu_check.py: state kept as one JSON document, goals, summary table.

The JSON is rewritten atomically (temp file + rename) after every stage and while a stage runs,
so a run stopped at any point leaves every finished result readable. Stage children append
rows to a JSON-lines file beside it; ``merge_rows`` folds them in.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

STAGES = ("build", "spot", "tests", "sanitizer", "bench", "cpu")
# Stages whose failure (or timeout, or not running for lack of time) fails the run.
CHECK_STAGES = ("build", "spot", "tests", "sanitizer")
STATUSES = ("ok", "fail", "timeout", "skip", "not-run")

# Targets the run reports against; misses are reported, never fail the run.
GOALS = {
    "gn_bandwidth": "GN+SiLU >= 85 % of measured copy bandwidth (x >= 32 MiB)",
    "gn_vs_compile": "GN+SiLU faster than torch.compile (x >= 32 MiB)",
    "attention_tflops": "attention fwd >= 450 TFLOP/s at D=64 bf16",
    "cross_attention_vs_mask": "varlen cross-attention >= 2x the fastest SDPA with a mask",
    "unet_vs_eager": "U-Net step >= 2x eager (our reference backend)",
}
GN_BANDWIDTH_TARGET = 0.85
ATTENTION_TFLOPS_TARGET = 450.0
CROSS_ATTENTION_SPEEDUP_TARGET = 2.0
UNET_SPEEDUP_TARGET = 2.0
DEFAULT_IMPL = "ours (default)"  # benchmarks/run.py's row of the dispatcher's own path; its peer is "eager" (or SDPA)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_rows(rows_path: Path, stage: str) -> list[dict]:
    """The rows a stage child appended (a torn last line from a killed child is dropped)."""
    if not rows_path.exists():
        return []
    rows = []
    for line in rows_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("stage") == stage:
            rows.append(row)
    return rows


def is_ours(impl: str) -> bool:
    return impl.startswith("ours")


def _best(rows, pick, key="ms"):
    timed = [r for r in rows if pick(r["impl"]) and r.get(key) is not None]
    return min(timed, key=lambda r: r[key]) if timed else None


def _cases(rows: list[dict], goal: str) -> dict[tuple, list[dict]]:
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind") == "row" and r.get("goal") == goal:
            cases.setdefault((r["op"], r["case"]), []).append(r)
    return cases


def _goal(name: str, entries: list[dict]) -> dict:
    """met: True when every case met it, False when any missed, None when nothing was measured."""
    measured = [e for e in entries if e["met"] is not None]
    met = None if not measured else all(e["met"] for e in measured)
    return {"name": name, "goal": GOALS[name], "met": met, "cases": entries}


def evaluate_goals(rows: list[dict]) -> list[dict]:
    """Each goal from the benchmark rows tagged with it; a case missing a number is reported as unmeasured."""
    goals = []

    bw, vs_compile = [], []
    for (op, case), rs in _cases(rows, "gn").items():
        ours = _best(rs, is_ours)
        frac = ours.get("fraction_of_copy") if ours else None
        bw.append({"case": case, "impl": ours["impl"] if ours else None,
                   "measured": None if frac is None else f"{100 * frac:.1f} % of copy",
                   "met": None if frac is None else frac >= GN_BANDWIDTH_TARGET})
        comp = _best(rs, lambda i: i == "torch.compile")
        ratio = comp["ms"] / ours["ms"] if ours and comp else None
        vs_compile.append({"case": case, "impl": ours["impl"] if ours else None,
                           "measured": None if ratio is None else f"{ratio:.2f}x torch.compile",
                           "met": None if ratio is None else ratio > 1.0})
    goals += [_goal("gn_bandwidth", bw), _goal("gn_vs_compile", vs_compile)]

    entries = []
    for (op, case), rs in _cases(rows, "attention").items():
        ours = _best(rs, is_ours, key="ms")
        tf = ours.get("tflops") if ours else None
        entries.append({"case": case, "impl": ours["impl"] if ours else None,
                        "measured": None if tf is None else f"{tf:.0f} TFLOP/s",
                        "met": None if tf is None else tf >= ATTENTION_TFLOPS_TARGET})
    goals.append(_goal("attention_tflops", entries))

    entries = []
    for (op, case), rs in _cases(rows, "cross_attention").items():
        ours = _best(rs, is_ours)
        masked = _best(rs, lambda i: i.startswith("sdpa+mask"))
        ratio = masked["ms"] / ours["ms"] if ours and masked else None
        entries.append({"case": case, "impl": ours["impl"] if ours else None,
                        "measured": None if ratio is None else f"{ratio:.2f}x {masked['impl']}",
                        "met": None if ratio is None else ratio >= CROSS_ATTENTION_SPEEDUP_TARGET})
    goals.append(_goal("cross_attention_vs_mask", entries))

    entries = []
    for (op, case), rs in _cases(rows, "unet").items():
        ours = _best(rs, lambda i: i == "ours")
        ref = _best(rs, lambda i: i == "reference")
        ratio = ref["ms"] / ours["ms"] if ours and ref else None
        entries.append({"case": case, "impl": "ours",
                        "measured": None if ratio is None else f"{ratio:.2f}x reference",
                        "met": None if ratio is None else ratio >= UNET_SPEEDUP_TARGET})
    goals.append(_goal("unet_vs_eager", entries))
    return goals


def failed_checks(stages: dict) -> list[str]:
    """The check stages that did not pass, as 'stage: status (note)'."""
    out = []
    for name in CHECK_STAGES:
        st = stages.get(name)
        if st is None:
            continue
        if st["status"] in ("fail", "timeout", "not-run"):
            out.append(f"{name}: {st['status']}" + (f" ({st['note']})" if st.get("note") else ""))
    for name in ("bench", "cpu"):  # a crash while timing (e.g. an illegal address); slow rows never fail
        st = stages.get(name)
        if st is not None and st["status"] == "fail":
            out.append(f"{name}: fail" + (f" ({st['note']})" if st.get("note") else ""))
    return out


def short_case(case: str) -> str:
    """A row's case with a long key-length list cut to its ends: 'len[32, 31, ..., 1]'."""
    return re.sub(r"len\[(\d+), (\d+), [^\]]*, (\d+)\]", r"len[\1, \2, ..., \3]", case)


def cpu_verdict(rows: list[dict]) -> dict:
    """How many of the cpu stage's "ours (default)" rows are at least as fast as their eager / SDPA peer,
    in all and per (threads, dtype); the rows below 1.0x and those whose time is missing."""
    ours = [r for r in rows if r.get("kind") == "row" and r["impl"] == DEFAULT_IMPL]
    by_pass: dict[str, list[int]] = {}
    below, untimed = [], []
    for r in ours:
        tally = by_pass.setdefault(f"{r.get('threads', '?')}T {r['dtype']}", [0, 0])
        tally[1] += 1
        if r.get("speedup") is None:
            untimed.append({"op": r["op"], "case": short_case(r["case"]), "note": r.get("note", "")})
        elif r["speedup"] < 1.0:
            below.append({"op": r["op"], "case": short_case(r["case"]), "speedup": round(r["speedup"], 3)})
        else:
            tally[0] += 1
    return {"rows": len(ours), "at_least_eager": sum(t[0] for t in by_pass.values()),
            "by_pass": {k: f"{ok}/{n}" for k, (ok, n) in by_pass.items()}, "below": below, "untimed": untimed}


def cpu_verdict_line(v: dict) -> str:
    text = f"ours (default) >= 1.0x eager/SDPA in {v['at_least_eager']}/{v['rows']} rows"
    if v["by_pass"]:
        text += " (" + ", ".join(f"{k} {n}" for k, n in v["by_pass"].items()) + ")"
    if v["untimed"]:
        text += f"; {len(v['untimed'])} not timed"
    return text


# ------------------------------------------------------------------ summary table

def _fmt(v, spec, width):
    return f"{v:{width}{spec}}" if v is not None else f"{'':>{width}}"


def format_impl(r: dict) -> str:
    """'impl 1.234 ms 456 TF/s 2.1x' (GB/s and % of the copy bandwidth for bytes-bound rows), or its note."""
    if r.get("ms") is None:
        return f"{r['impl']} n/a ({(r.get('note') or '')[:60]})"
    text = f"{r['impl']} {r['ms']:.3f} ms"
    if r.get("tflops") is not None:
        text += f" {r['tflops']:.0f} TF/s"
    elif r.get("gbps") is not None:
        text += f" {r['gbps']:.0f} GB/s"
        if r.get("fraction_of_copy") is not None:
            text += f" ({100 * r['fraction_of_copy']:.0f}%)"
    if r.get("speedup") is not None and r["impl"] not in ("eager", "reference"):
        text += f" {r['speedup']:.2f}x"
    return text


def bench_lines(rows: list[dict], width: int = 150) -> list[str]:
    """One block per (op, case), its implementations in the order measured, wrapped at `width`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"]), []).append(r)
    lines = []
    for (op, case), rs in groups.items():
        line = f"  {op} {case}:"
        for item in (format_impl(r) for r in rs):
            if len(line) + len(item) + 3 > width:
                lines.append(line)
                line = "     "
            line += f" | {item}" if not line.endswith(":") and line.strip() else f" {item}"
        lines.append(line)
    return lines


def cpu_lines(st: dict, most: int = 25) -> list[str]:
    """The cpu stage's verdict, the rows below 1.0x (the first `most`), what was not timed or reached."""
    v = st.get("verdict")
    if not v:
        return []
    lines = [f"cpu ops on the host CPU ({st.get('cpu_model', '?')}: {st.get('isa', '?')}; torch's kernels "
             f"{st.get('torch_cpu_capability', '?')}; 1T: thread CPU time, 2T: wall): {cpu_verdict_line(v)}"]
    for b in v["below"][:most]:
        lines.append(f"  BELOW {b['op']} {b['case']}: {b['speedup']:.2f}x")
    if len(v["below"]) > most:
        lines.append(f"  ... and {len(v['below']) - most} more below 1.0x (stages.cpu.verdict in the JSON)")
    for u in v["untimed"][:most]:
        lines.append(f"  NOT TIMED {u['op']} {u['case']}: {u['note'][:80]}")
    if st.get("unreached"):
        lines.append(f"  not reached in the budget: {len(st['unreached'])} shapes, from {st['unreached'][0]}")
    return lines


def summary_lines(state: dict) -> list[str]:
    lines = [f"gpu_check summary: {state.get('device', '?')}" + ("  (DRY RUN on CPU)" if state.get("dry_run") else "")]
    lines.append(f"  {'stage':<10} {'status':<8} {'seconds':>8} {'budget':>7}  note")
    for name in STAGES:
        st = state["stages"].get(name, {"status": "not-run"})
        sec = _fmt(st.get("seconds"), ".1f", 8)
        bud = _fmt(st.get("budget_s"), ".0f", 7)
        lines.append(f"  {name:<10} {st['status']:<8} {sec} {bud}  {st.get('note', '')[:90]}")
    for run in state["stages"].get("tests", {}).get("runs", []):
        counts = (f"{run.get('passed', 0)} passed, {run.get('failed', 0) + run.get('errors', 0)} failed, "
                  f"{run.get('skipped', 0)} skipped" if "passed" in run else run.get("note", ""))
        lines.append(f"  tests: {run['name']}: {run['status']} ({counts})")
        for name in run.get("failures", [])[:10]:
            lines.append(f"    FAILED {name}")
    for case in state["stages"].get("sanitizer", {}).get("cases", []):
        if case["status"] != "ok":
            lines.append(f"  sanitizer {case['name']}: {case['status']} {case.get('note', '')}")
    spot = state["stages"].get("spot", {}).get("rows", [])
    bad = [r for r in spot if not r.get("ok")]
    if spot:
        lines.append(f"spot-check vs float64: {len(spot) - len(bad)}/{len(spot)} within tolerance"
                     + (f"; worst {max(r.get('err') or 0 for r in spot):.2e}" if any(r.get('err') for r in spot) else ""))
        for r in bad[:12]:
            lines.append(f"  MISMATCH {r['op']} {r['case']} {r['dtype']} {r['backend']}: err {r.get('err')} "
                         f"tol {r.get('tol')} {r.get('note', '')[:80]}")
    bench = state["stages"].get("bench", {})
    limits = bench.get("limits")
    rows = [r for r in bench.get("rows", []) if r.get("kind") == "row"]
    if limits or rows:
        if limits:
            lines.append(f"benchmarks ({limits.get('dtype', '')}, median ms): copy {limits.get('copy_GBps', 0):.0f} "
                         f"GB/s (read + write), matmul {limits.get('matmul_TFLOPs', 0):.0f} TFLOP/s; "
                         "Nx = eager (or reference) ms / ms")
        lines += bench_lines(rows)
    lines += cpu_lines(state["stages"].get("cpu", {}))
    goals = state.get("goals", [])
    if goals:
        lines.append("goals (reported, not failing):")
        for g in goals:
            mark = {True: "PASS", False: "MISS", None: "n/a "}[g["met"]]
            detail = "; ".join(f"{c['case']}: {c['measured'] or 'unmeasured'}"
                               + ("" if c["met"] is None else (" ok" if c["met"] else " miss")) for c in g["cases"])
            lines.append(f"  [{mark}] {g['goal']}: {detail or 'unmeasured'}")
    failed = state.get("failed", [])
    lines.append("RESULT: " + ("FAIL: " + "; ".join(failed) if failed else "all checks passed")
                 + f"  (JSON: {state.get('out', '?')})")
    return lines
