"""Compile the Triton kernels for sm_90a without a GPU and print their resource usage.

    python -m dalle3_fast.ops.triton.sm90_report            # table: registers, stack (spills), shared memory
    python -m dalle3_fast.ops.triton.sm90_report --check    # exit 1 if a hot config spills

The interpreter (TRITON_INTERPRET=1) runs kernels on CPU but skips the compiler's type
checks; this compiles the real thing. Arguments are specialised the way a launch on
contiguous tensors specialises them (head-dim / inner stride == 1, other strides and
pointers 16-divisible). Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
import triton.language as tl

from dalle3_fast.op_limits import SUPPORTED_HEAD_DIMS


@dataclass
class Case:
    name: str
    kernel: object
    pointers: dict          # arg name -> triton pointer type, e.g. "*bf16"
    constexprs: dict
    num_warps: int
    num_stages: int
    floats: tuple = ()      # fp32 scalar args
    ones: tuple = ()        # int args specialised to 1
    must_not_spill: bool = True
    divisible: tuple = field(default_factory=tuple)  # int args known 16-divisible


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(case: Case):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    fn = _jit_function(case.kernel)
    constexprs = dict(case.constexprs)
    constexprs.update({name: 1 for name in case.ones if name in fn.arg_names})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = case.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in case.divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _resource_usage(compiled) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    usage = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "local": int(usage["LOCAL"]),
            "smem": compiled.metadata.shared}


def _attention_cases(dtype: str, head_dim: int, every_config: bool = False):
    """Each attention kernel with the configs autotuning may pick for this head dim (the first, or all)."""
    import torch

    from dalle3_fast.ops.triton import flash_attention as fa

    block_d = triton.next_power_of_2(head_dim)
    strides = ("sqb", "sqn", "sqh", "skb", "skn", "skh", "svb", "svn", "svh", "sob", "son", "soh", "sgb", "sgn", "sgh",
               "sdkb", "sdkn", "sdkh", "sdvb", "sdvn", "sdvh", "sdqb", "sdqn", "sdqh")
    ones = ("sqd", "skd", "svd", "sod", "sgd", "sdkd", "sdvd", "sdqd")
    split = fa._head_dim_split(head_dim)
    common = dict(HAS_LENGTHS=True, ACC=tl.float32, PRECISION="tf32", **split)
    pointers = {n: "*" + dtype for n in ("Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ")}
    pointers.update(Lse="*fp32", Delta="*fp32", Lengths="*i32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    prune_args = {"Q": torch.empty(0, dtype=torch_dtype), "N_K": 4096, **split}
    cases = [Case(f"attention bwd delta {dtype} D={head_dim}", fa._attn_bwd_delta_kernel, pointers,
                  dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ACC=tl.float32, BLOCK_M=fa._delta_block(block_d)), 4, 1,
                  ones=ones, divisible=strides)]
    for what, kernel, configs, prune in (("fwd", fa._fwd, fa._FWD_CONFIGS, fa._prune_fwd),
                                         ("bwd dkdv", fa._dkdv, fa._DKDV_CONFIGS, fa._prune_dkdv),
                                         ("bwd dq", fa._dq, fa._DQ_CONFIGS, fa._prune_dq)):
        kept = prune(configs, prune_args)
        for config in kept if every_config else kept[:1]:
            tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
            cases.append(Case(f"attention {what} {dtype} D={head_dim} {tile}", kernel, pointers,
                              {**common, **config.kwargs}, config.num_warps, config.num_stages,
                              floats=("scale", "qk_scale_log2"), ones=ones, divisible=strides))
    return cases


def _group_norm_cases(dtype: str, channels_per_group: int, spatial: int, phases=(0, 1, 2)):
    from dalle3_fast.ops.triton import group_norm_silu as gn

    t = "*" + dtype
    data = {n: t for n in ("X", "Y", "GY", "DX", "W", "Bias", "Add", "Scale", "Shift", "DAdd", "DScale", "DShift")}
    stats = {n: "*fp32" for n in ("Mean", "Rstd", "Partial", "DWeightB", "DBiasB")}
    cases = []
    for kernel, tile, what in ((gn._gn_fwd_kernel, gn._TILE_FWD, "fwd"), (gn._gn_bwd_kernel, gn._TILE_BWD, "bwd")):
        block_c, block_s = gn._blocks(channels_per_group, spatial, tile)
        for phase in phases:
            constexprs = dict(CG=channels_per_group, HAS_ADD=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True,
                              PHASE=phase, SPLITS_P2=16, ACC=tl.float32, BLOCK_C=block_c, BLOCK_S=block_s)
            cases.append(Case(f"group_norm_silu {what} {dtype} Cg={channels_per_group} S={spatial} phase={phase} "
                              f"tile={block_c}x{block_s}", kernel, {**data, **stats}, constexprs, gn._NUM_WARPS, 1,
                              floats=("eps",), ones=("sxs",), divisible=("sxb", "sxc", "C", "S", "S_CHUNK")))
    return cases


def hot_cases():
    """Configs that must compile without spills (the ones the GPU path uses most)."""
    return (_attention_cases("bf16", 80) + _attention_cases("bf16", 64)[1:2]
            + _group_norm_cases("bf16", 10, 4096, phases=(0, 2)))


def all_cases():
    cases = []
    for head_dim in SUPPORTED_HEAD_DIMS:
        cases += _attention_cases("bf16", head_dim, every_config=True)
    for cg, s in ((10, 4096), (40, 64), (4, 262144)):
        cases += _group_norm_cases("bf16", cg, s)
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compile only the hot configs and exit 1 if any of them uses stack/local memory (spills)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_report: unset TRITON_INTERPRET; the interpreter does not compile kernels", file=sys.stderr)
        return 2
    failures = 0
    for case in hot_cases() if args.check else all_cases():
        usage = _resource_usage(_compile(case))
        spills = usage["stack"] > 0 or usage["local"] > 0
        flag = "SPILLS" if spills else ""
        print(f"{case.name:72s} regs={usage['regs']:3d} stack={usage['stack']:5d} smem={usage['smem']:6d} {flag}")
        failures += int(spills and case.must_not_spill)
    if args.check and failures:
        print(f"sm90_report: {failures} hot config(s) spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
