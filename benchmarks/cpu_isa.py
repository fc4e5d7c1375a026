"""The host CPU's model and the ISA extensions that decide which kernel clone runs (light: no torch import).

benchmarks/run.py records them beside every CPU row; benchmarks/gpu_check.py reads them before it
starts its cpu stage, whose rows only mean something new on an AVX-512 host.
"""
from __future__ import annotations

import os
import platform


def cpu_info() -> dict:
    """Model name, logical CPUs and the avx512f / avx2 / fma flags (None where /proc/cpuinfo is unreadable)."""
    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "avx512f": None, "avx2": None, "fma": None}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] in (platform.processor(), platform.machine()):
            info["model"] = value.strip()
        elif key == "flags":
            flags = set(value.split())
            info.update(avx512f="avx512f" in flags, avx2="avx2" in flags, fma="fma" in flags)
            break
    return info


def isa_summary(info: dict) -> str:
    if info["avx512f"] is None:
        return "ISA unknown"
    return ", ".join(f"{'' if info[k] else 'no '}{k.upper()}" for k in ("avx512f", "avx2", "fma"))


def torch_cpu_capability() -> str:
    """The vector ISA PyTorch's own CPU kernels dispatch to here ("AVX512", "AVX2", ...)."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception as exc:  # an old or unusual build: reported, not fatal
        return f"unknown ({type(exc).__name__})"
