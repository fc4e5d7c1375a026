"""The op limits are written once, in csrc/op_limits.h; Python reads them from dalle3_fast._C.
The stand-in values for builds without the extension must equal the header."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dalle3_fast.ops as ops
from dalle3_fast import _native

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "op_limits.h"


def header_limits() -> dict:
    text = HEADER.read_text()
    dims = re.search(r"#define D3F_FOR_EACH_HEAD_DIM\(X\)((?: X\(\d+\))+)", text)
    tokens = re.search(r"kMaxKeyTokens = (\d+);", text)
    assert dims and tokens, f"{HEADER} no longer has the lines this test reads"
    return {"SUPPORTED_HEAD_DIMS": tuple(int(d) for d in re.findall(r"\d+", dims.group(1))),
            "MAX_KEY_TOKENS": int(tokens.group(1))}


def test_stand_in_limits_equal_the_header():
    assert _native._LIMITS_WITHOUT_EXTENSION == header_limits()


def test_extension_exports_the_header_and_ops_reads_it():
    if not _native.has_cpu_kernels():
        pytest.skip("the native extension is not built")
    want = header_limits()
    assert _native._C.SUPPORTED_HEAD_DIMS == want["SUPPORTED_HEAD_DIMS"]
    assert _native._C.MAX_KEY_TOKENS == want["MAX_KEY_TOKENS"]
    assert ops.SUPPORTED_HEAD_DIMS == want["SUPPORTED_HEAD_DIMS"]
    assert ops.MAX_KEY_TOKENS == want["MAX_KEY_TOKENS"]
