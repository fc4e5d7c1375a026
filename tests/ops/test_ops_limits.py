"""The op limits are written once, in dalle3_fast/op_limits.py. csrc/op_limits.h is generated from
it (csrc/generate_op_limits.py, run by setup.py); dalle3_fast._C exports what it was compiled with
and dalle3_fast.ops reads that, or the Python file in a build without the extension."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

import dalle3_fast.ops as ops
from dalle3_fast import _native, op_limits

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "op_limits.h"
GENERATOR = runpy.run_path(str(ROOT / "csrc" / "generate_op_limits.py"))
SOURCE_LIMITS = {"SUPPORTED_HEAD_DIMS": op_limits.SUPPORTED_HEAD_DIMS, "MAX_KEY_TOKENS": op_limits.MAX_KEY_TOKENS}


def header_limits(text: str) -> dict:
    """The limits as the C++ compiler sees them (read independently of the generator)."""
    dims = re.search(r"#define D3F_FOR_EACH_HEAD_DIM\(X\)((?: X\(\d+\))+)\n", text)
    tokens = re.search(r"kMaxKeyTokens = (\d+);", text)
    assert dims and tokens, f"{HEADER} no longer has the lines this test reads"
    return {"SUPPORTED_HEAD_DIMS": tuple(int(d) for d in re.findall(r"\d+", dims.group(1))),
            "MAX_KEY_TOKENS": int(tokens.group(1))}


def test_header_is_generated_from_the_python_limits():
    assert HEADER.read_text() == GENERATOR["header_text"](GENERATOR["read_limits"]()), \
        "csrc/op_limits.h is stale or edited by hand: edit dalle3_fast/op_limits.py, run python csrc/generate_op_limits.py"
    assert header_limits(HEADER.read_text()) == SOURCE_LIMITS


def test_generator_writes_the_values_it_is_given():
    limits = {"SUPPORTED_HEAD_DIMS": (16, 48, 256), "MAX_KEY_TOKENS": 77}
    assert header_limits(GENERATOR["header_text"](limits)) == limits


def test_generator_refuses_limits_the_kernels_cannot_take(tmp_path):
    for bad in ("SUPPORTED_HEAD_DIMS = (64, 32)\nMAX_KEY_TOKENS = 512\n",
                "SUPPORTED_HEAD_DIMS = (32, 32)\nMAX_KEY_TOKENS = 512\n",
                "SUPPORTED_HEAD_DIMS = [32]\nMAX_KEY_TOKENS = 512\n",
                "SUPPORTED_HEAD_DIMS = (32,)\nMAX_KEY_TOKENS = 0\n"):
        source = tmp_path / "op_limits.py"
        source.write_text(bad)
        with pytest.raises(SystemExit, match="op_limits.py"):
            GENERATOR["read_limits"](source)


def test_without_the_extension_ops_reads_the_python_limits(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    assert {name: _native.limit(name) for name in SOURCE_LIMITS} == SOURCE_LIMITS


def test_extension_exports_the_header_and_ops_reads_it():
    if not _native.has_cpu_kernels():
        pytest.skip("the native extension is not built")
    want = header_limits(HEADER.read_text())
    assert want == SOURCE_LIMITS, "the header is stale: rebuild (setup.py regenerates it)"
    assert _native._C.SUPPORTED_HEAD_DIMS == want["SUPPORTED_HEAD_DIMS"], "the extension is stale: rebuild it"
    assert _native._C.MAX_KEY_TOKENS == want["MAX_KEY_TOKENS"], "the extension is stale: rebuild it"
    assert ops.SUPPORTED_HEAD_DIMS == want["SUPPORTED_HEAD_DIMS"]
    assert ops.MAX_KEY_TOKENS == want["MAX_KEY_TOKENS"]
