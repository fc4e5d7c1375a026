"""The hot loops of the CPU kernels are vector code in every per-ISA clone.

The extension is built with portable flags and GCC's target_clones (csrc/cpu/simd.h): each
hot loop exists as an AVX-512 ("arch_x86_64_v4"), an AVX2+FMA ("arch_x86_64_v3") and an
SSE2 ("default") clone. GCC silently leaves a loop scalar when it cannot if-convert it (it
did so for every loop over exp/sigmoid under -ftrapping-math, 3-8x slower on AVX2), so
this reads the built extension's disassembly and counts the packed float instructions of
each clone. Speed itself is measured in benchmarks/run.py, not here.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys

import pytest

from dalle3_fast import _native

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="per-ISA clones are built on x86-64 Linux only")

# Loops over exp/sigmoid: their vector body alone holds the exp polynomial (>= 10 packed ops).
EXP_LOOPS = {
    "gn": ["k_apply_run", "k_apply_rows", "k_grad_sums_run", "k_grad_sums_rows", "k_grad_apply_run",
           "k_grad_apply_rows"],
    "attn": ["k_online_softmax_tile", "k_recompute_probs"],
}
# Plain arithmetic loops.
OTHER_LOOPS = {
    "gn": ["k_shifted_sums_run", "k_shifted_sums_rows"],
    "attn": ["k_scale_rows", "k_score_grad", "k_row_dots"],
}
# Packed single-precision arithmetic (FMA, mul, add, sub, div, min, max).
_PACKED = re.compile(r"^v?(?:f(?:n?m(?:add|sub))\d*|mul|add|sub|div|min|max)ps\b")


def _so_path() -> str:
    if _native._C is None:
        pytest.skip(f"the native extension is not built: {_native.why_not('cpu')}")
    return _native._C.__file__


@pytest.fixture(scope="module")
def clones() -> dict[str, list[str]]:
    """Instructions of every float clone of the kernels' entry points, by demangled name."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to check the kernels' vector code; install binutils"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _so_path()], check=True,
                          capture_output=True, text=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            current = name if name.startswith("d3f::") and "float" in name and "[clone ." in name else None
            if current:
                functions[current] = []
        elif current and "\t" in line:
            functions[current].append(line.split("\t", 1)[1].strip())
    return functions


def _clone(clones, ns: str, fn: str, isa: str) -> list[str]:
    found = [ins for name, ins in clones.items()
             if name.startswith(f"d3f::{ns}::(anonymous namespace)::{fn}(") and name.endswith(f"[clone .{isa}]")]
    assert len(found) == 1, f"{ns}::{fn} [clone .{isa}] (float) not found once in the extension ({len(found)})"
    return found[0]


def _packed(instructions: list[str], register: str) -> int:
    return sum(1 for ins in instructions if _PACKED.match(ins) and f"%{register}" in ins)


def _cases(table):
    return [(ns, fn) for ns, fns in table.items() for fn in fns]


@pytest.mark.parametrize("ns,fn", _cases(EXP_LOOPS))
def test_exp_loops_are_vector_code_on_avx2_and_sse2(clones, ns, fn):
    avx2 = _packed(_clone(clones, ns, fn, "arch_x86_64_v3"), "ymm")
    sse2 = _packed(_clone(clones, ns, fn, "default"), "xmm")
    assert avx2 >= 12, f"{ns}::{fn}: the AVX2 clone has {avx2} packed ymm float ops; its exp loop is scalar"
    assert sse2 >= 12, f"{ns}::{fn}: the SSE2 clone has {sse2} packed xmm float ops; its exp loop is scalar"


@pytest.mark.parametrize("ns,fn", _cases(EXP_LOOPS) + _cases(OTHER_LOOPS))
def test_every_hot_loop_is_vector_code_on_avx2(clones, ns, fn):
    avx2 = _packed(_clone(clones, ns, fn, "arch_x86_64_v3"), "ymm")
    assert avx2 >= 1, f"{ns}::{fn}: the AVX2 clone has no packed ymm float op; the loop is scalar"


@pytest.mark.parametrize("ns,fn", _cases(EXP_LOOPS))
def test_exp_loops_are_vector_code_on_avx512(clones, ns, fn):
    avx512 = _packed(_clone(clones, ns, fn, "arch_x86_64_v4"), "zmm")
    assert avx512 >= 12, f"{ns}::{fn}: the AVX-512 clone has {avx512} packed zmm float ops; its exp loop is scalar"
