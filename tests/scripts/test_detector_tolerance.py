"""scripts/detector_tolerance.py: degraded held-out images scored by the detector."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "detector_tolerance.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_rows_for_every_degradation_and_more_blur_reads_worse(tmp_path):
    r = run("--n", "12", "--json", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(rows) == 8 and all(set(row) == {"psnr_db", "shape", "colour", "count", "all"} for row in rows.values())
    blurs = [rows[f"gaussian blur sigma {s} px"] for s in ("0.5", "0.75", "1.0", "1.5")]
    assert [b["psnr_db"] for b in blurs] == sorted((b["psnr_db"] for b in blurs), reverse=True)
    assert blurs[0]["shape"] >= blurs[-1]["shape"] and blurs[0]["shape"] > 0.5


def test_bad_arguments_are_one_line():
    r = run("--n", "0")
    assert r.returncode == 2 and "--n must be >= 1" in r.stderr and "Traceback" not in r.stderr
