"""The CUDA sources compile for sm_80 and sm_90a, and ptxas reports no spills and no stack.

Needs only nvcc (no GPU): every .cu under csrc/cuda (instantiations/ included) is compiled with
-Xptxas -v, the report is parsed per kernel and architecture, and the objects must link with no
undefined symbol. binding.cpp is syntax-checked against torch's headers. The compiles run two at
a time, longest first.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = ("sm_80", "sm_90a")
NVCC_FLAGS = [
    "-c", "-O3", "-std=c++17", "--use_fast_math",
    "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
    "-Xptxas", "-v",
]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", CUDA_DIR / "instantiations" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
# Kernel templates each file must define (every instantiation is checked, these must exist).
EXPECTED = {
    "group_norm_silu_multipass.cu": ("gn_cf_kernel", "gn_cl_kernel", "gn_fwd_finalize_kernel",
                                     "gn_bwd_finalize_kernel", "gn_dweight_dbias_kernel"),
    "group_norm_silu_single_pass.cu": ("gn_fused_fwd_kernel", "gn_fused_bwd_kernel"),
    "attention_bwd.cu": ("attn_delta_kernel",),
    "attention_simple.cu": ("attn_simple_fwd_kernel", "attn_simple_dq_kernel", "attn_simple_dkdv_kernel"),
    **{f"instantiations/{name}": ("attn_fwd_kernel",) if "_fwd_" in name else ("attn_dq_kernel", "attn_dkdv_kernel")
       for name in GENERATOR.expected_files()},
}


def cuda_sources() -> list[Path]:
    return sorted(CUDA_DIR.rglob("*.cu"))


def source_name(path: Path) -> str:
    return path.relative_to(CUDA_DIR).as_posix()


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME); CUDA sources not compiled")


def parse_ptxas(report: str) -> list[dict]:
    """One entry per (kernel, arch): registers, stack frame and spill bytes."""
    kernels: list[dict] = []
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2)}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return kernels


def _compile(source: Path, out_dir: Path) -> tuple[int, str]:
    cmd = [NVCC, *NVCC_FLAGS, str(source), "-o", str(out_dir / (source.stem + ".o"))]  # stems are unique
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CUDA_DIR)
    return proc.returncode, proc.stdout + proc.stderr


def _torch_includes() -> list[str]:
    import torch.utils.cpp_extension as ext

    return [f"-I{p}" for p in ext.include_paths()]


def _binding_check() -> tuple[int, str]:
    gxx = shutil.which("g++")
    cmd = [gxx, "-fsyntax-only", "-std=c++17", "-DWITH_CUDA",
           # CPU wheels of torch lack the generated c10/cuda/impl/cuda_cmake_macros.h.
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *_torch_includes(), f"-I{Path(NVCC).parents[1] / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", str(CUDA_DIR / "binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles every .cu and syntax-checks binding.cpp, two jobs at a time."""
    out_dir = tmp_path_factory.mktemp("cuda_build")
    sources = sorted(cuda_sources(), key=lambda p: -p.stat().st_size)  # longest first
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        if shutil.which("g++") and (Path(NVCC).parents[1] / "include" / "cuda_runtime.h").exists():
            jobs["binding.cpp"] = pool.submit(_binding_check)
        for src in sources:
            jobs[source_name(src)] = pool.submit(_compile, src, out_dir)
        results = {name: fut.result() for name, fut in jobs.items()}
    results["objects"] = out_dir
    return results


def test_parse_ptxas_reads_every_field():
    report = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    assert parse_ptxas(report) == [{"name": "_Z3fooPf", "arch": "sm_90a", "stack": 8, "spill_stores": 4,
                                    "spill_loads": 12, "registers": 40}]


@needs_nvcc
def test_every_cuda_source_compiles_without_spills_or_stack(builds):
    sources = [source_name(p) for p in cuda_sources()]
    assert set(EXPECTED) <= set(sources), f"missing CUDA sources: {set(EXPECTED) - set(sources)}"
    problems = []
    for name in sources:
        rc, report = builds[name]
        assert rc == 0, f"nvcc failed on {name}:\n{report[-4000:]}"
        kernels = parse_ptxas(report)
        for arch in ARCHS:
            present = [k["name"] for k in kernels if k["arch"] == arch]
            for family in EXPECTED.get(name, ()):
                assert any(family in k for k in present), f"{name}: no {family} compiled for {arch}"
        for k in kernels:
            assert {"stack", "spill_stores", "spill_loads", "registers"} <= set(k), f"unparsed ptxas entry {k}"
            # Every kernel here is on a hot path: no local-memory stack, no spills.
            if k["spill_stores"] or k["spill_loads"] or k["stack"]:
                problems.append(f"{name} {k['arch']} {k['name']}: stack {k['stack']} B, "
                                f"spills {k['spill_stores']}/{k['spill_loads']} B, {k['registers']} registers")
    assert not problems, "ptxas reports local memory use:\n" + "\n".join(problems)


@needs_nvcc
def test_binding_passes_syntax_check(builds):
    if "binding.cpp" not in builds:
        pytest.skip("g++ or the CUDA runtime headers are missing")
    rc, report = builds["binding.cpp"]
    errors = [line for line in report.splitlines() if "error" in line]
    assert rc == 0, "binding.cpp does not compile:\n" + "\n".join(errors[:40])


def test_instantiation_files_match_the_generator():
    """One file per (pass, head dim of csrc/op_limits.h, dtype), as generate.py writes them."""
    folder = CUDA_DIR / "instantiations"
    want = GENERATOR.expected_files()
    have = {p.name: p.read_text() for p in folder.glob("*.cu")}
    assert sorted(have) == sorted(want), "run python csrc/cuda/instantiations/generate.py"
    assert all(have[name] == text for name, text in want.items()), "run python csrc/cuda/instantiations/generate.py"


@needs_nvcc
def test_cuda_objects_link_without_undefined_symbols(builds):
    """Every dispatch target (e.g. attention_fwd_tc<__half, 40>) is instantiated somewhere."""
    objects = sorted(str(p) for p in builds["objects"].glob("*.o"))
    assert len(objects) == len(cuda_sources())
    out = builds["objects"] / "all.so"
    proc = subprocess.run([NVCC, "-shared", "-Xlinker", "--no-undefined", *objects, "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, "the CUDA objects do not link:\n" + (proc.stdout + proc.stderr)[-4000:]
