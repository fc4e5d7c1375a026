"""Builds dalle3_fast and its native extension dalle3_fast._C.

CPU kernels are always compiled; CUDA kernels too when the installed torch has
CUDA and nvcc is found. Build against the installed torch:

    pip install -e . --no-build-isolation

Environment: DALLE3_FAST_NO_NATIVE=1 skips the extension (pure Python + Triton);
DALLE3_FAST_FORCE_CUDA=1 / DALLE3_FAST_NO_CUDA=1 force CUDA on / off;
TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") and MAX_JOBS are honoured.

Before compiling, the sources generated from dalle3_fast/op_limits.py (csrc/op_limits.h and the
CUDA attention instantiations) are brought up to date; see csrc/README.md.
"""
import glob
import os
import runpy
import sys

from setuptools import setup


HERE = os.path.dirname(os.path.abspath(__file__))
GENERATORS = ("csrc/generate_op_limits.py", "csrc/cuda/instantiations/generate.py")


def generate_sources():
    """Write the sources derived from dalle3_fast/op_limits.py; each file only when its text changes."""
    for script in GENERATORS:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")


def native_extensions():
    if os.environ.get("DALLE3_FAST_NO_NATIVE") == "1":
        print("dalle3_fast: DALLE3_FAST_NO_NATIVE=1, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("dalle3_fast: torch is not importable in the build environment; building without the native "
              "extension (install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    generate_sources()
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # -fno-trapping-math: without it GCC keeps the clamps of exp_f32 (csrc/cpu/simd.h) as branches
    # and leaves every loop over exp/sigmoid scalar in the AVX2 and SSE2 clones (tests/test_cpu_vectorised.py).
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math", *openmp]
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    want_cuda = os.environ.get("DALLE3_FAST_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("DALLE3_FAST_NO_CUDA") != "1")
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/instantiations/*.cu"))
        sources += sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "dalle3_fast._C", sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("dalle3_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    print(f"dalle3_fast: building the native extension with {'CPU + CUDA' if want_cuda else 'CPU'} kernels",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
