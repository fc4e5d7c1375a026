"""The model-level suites of benchmarks/run.py: one U-Net step (``--suite unet``) and the whole tiny
pipeline (``--suite pipeline``), ours beside its peers in the same process on the same weights and inputs.

unet: the shipped tiny U-Net at batch 32, 8x8 latents (the CFG batch of 16 prompts), 32 text tokens; and
SD1.5's U-Net layout at 1/5 width (block_out_channels 64/128/256/256, head width 32, CLIP-L's 768-wide
tokens), random init, batch 2, 32x32 latents, 77 tokens. Peers: diffusers' UNet2DConditionModel eager
loaded from the diffusers-format weights our U-Net saves (the baseline), torch.compile of it and of ours,
ours forced to the reference backend, and onnxruntime on our exported U-Net. Ours runs as the pipeline
runs it: the prompt's cross-attention K/V computed once per sampling call (``text_kv``), outside the step.

pipeline: images/s of the tiny pipeline, 16 prompts, 20 steps, CFG 5: ours (default backend) vs the same
pipeline under ``use_backend("reference")`` (the baseline) vs ours with ``--unet-engine`` (onnxruntime).
``--busy N`` repeats the comparison while N other processes spin on the CPU (one row set per count), to
show how each path degrades when the cores are oversubscribed.
"""
from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import dalle3_fast.ops as ops
from dalle3_fast.assets import TINY_PIPELINE
from dalle3_fast.models.unet import UNet
from dalle3_fast.models.unet_config import UNetConfig, unet_config

BASELINE_UNET = "diffusers eager"
BASELINE_PIPELINE = "reference backend"


def sd15_fifth_config() -> UNetConfig:
    """SD1.5's U-Net (the "sd15" preset) at 1/5 of its widths; heads chosen for the head width 32 our ops take."""
    return unet_config("sd15", block_out_channels=[64, 128, 256, 256], attention_head_dim=[2, 4, 8, 8])


def unet_cases() -> dict[str, dict]:
    """name -> how to build the U-Net and its inputs."""
    return {
        "tiny": dict(load=lambda: UNet.from_pretrained(TINY_PIPELINE / "unet"), batch=32, size=8, tokens=32,
                     label="tiny U-Net (shipped) b32 8x8 L32"),
        "sd15-fifth": dict(load=lambda: _seeded(lambda: UNet(sd15_fifth_config())), batch=2, size=32, tokens=77,
                           label="SD1.5 layout 1/5 width b2 32x32 L77"),
    }


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def unet_inputs(unet: UNet, batch: int, size: int, tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g, dtype=torch.int32)
    lengths[0] = tokens  # the longest prompt fills the padding, as a batch's does
    return {"sample": torch.randn(batch, unet.in_channels, size, size, generator=g),
            "timestep": torch.full((batch,), 500.0),
            "tokens": torch.randn(batch, tokens, unet.text_dim, generator=g),
            "lengths": lengths}


def step_flops(unet: UNet, sample, t, kv) -> float:
    """FLOPs of one step (convolutions, GEMMs and attention's two products, every key counted), counted on
    the reference backend (plain ATen ops) with torch's FlopCounterMode."""
    from torch.utils import flop_counter

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # torch counts the CUDA SDPA kernels, not the CPU one
    if cpu_sdpa not in flop_counter.flop_registry and cpu_sdpa.default not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    with ops.use_backend("reference"), flop_counter.FlopCounterMode(display=False) as counter:
        unet(sample, t, text_kv=kv)
    return float(counter.get_total_flops())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _timed_compile(fn, call):
    """torch.compile(fn), compiled by one call of ``call(compiled)``; (compiled, seconds to compile)."""
    compiled = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    call(compiled)
    return compiled, time.perf_counter() - t0


def export_unet_onnx(unet: UNet, path: Path, size: int, latent_factor: int = 8) -> Path:
    """Our exporter on ``unet`` alone (no pipeline): dynamic batch, sizes around ``size`` latents."""
    from dalle3_fast.export.graphs import unet_spec
    from dalle3_fast.export.onnx_export import export_onnx

    spec = unet_spec(SimpleNamespace(unet=unet, downsample_factor=latent_factor), torch.float32)
    px = size * latent_factor
    export_onnx(spec, path, opt_size=(px, px), min_size=(px // 2, px // 2), max_size=(2 * px, 2 * px), max_batch=64)
    return path


def _diffusers_peer(unet: UNet, workdir: Path):
    """diffusers' UNet2DConditionModel on ``unet``'s weights (written and read in diffusers' format), or why not."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        return None, f"skipped: diffusers is not installed ({exc})"
    unet.save_pretrained(workdir / "unet")
    return UNet2DConditionModel.from_pretrained(workdir / "unet").eval(), ""


def bench_unet_case(bench, args, name: str, case: dict):
    unet = case["load"]().eval()
    x = unet_inputs(unet, case["batch"], case["size"], case["tokens"])
    sample, t, tokens, lengths = x["sample"], x["timestep"], x["tokens"], x["lengths"]
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None].long()
    shape, dtype = case["label"], torch.float32
    op = "unet step"
    impls, notes, outputs = {}, {}, {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dif, why = _diffusers_peer(unet, tmp)
        if dif is None:
            bench.add_skipped(op, shape, dtype, BASELINE_UNET, why)
        else:
            def dif_step(m=dif):
                return m(sample, t, tokens, encoder_attention_mask=mask, return_dict=False)[0]

            impls[BASELINE_UNET] = dif_step
            outputs[BASELINE_UNET] = dif_step()

        kv = unet.precompute_text_kv(tokens, lengths)

        def ours_step(m=unet):
            return m(sample, t, text_kv=kv)

        impls["ours"] = ours_step
        impls["ours reference backend"] = lambda: _with_backend("reference", ours_step)
        impls["ours, K/V per step"] = lambda: unet(sample, t, tokens, lengths)
        outputs["ours"] = ours_step()
        outputs["ours, K/V per step"] = impls["ours, K/V per step"]()
        outputs["ours reference backend"] = impls["ours reference backend"]()

        if args.compile:
            for label, fn, call in (
                    ("diffusers torch.compile", dif,
                     lambda c: c(sample, t, tokens, encoder_attention_mask=mask, return_dict=False)[0]),
                    ("ours torch.compile", unet, lambda c: c(sample, t, text_kv=kv))):
                if fn is None:
                    continue
                try:
                    compiled, seconds = _timed_compile(fn, call)
                except Exception as exc:  # a peer that does not compile is reported, not fatal
                    bench.add_skipped(op, shape, dtype, label, f"did not compile: {str(exc).splitlines()[0][:100]}")
                    continue
                impls[label] = lambda c=compiled, call=call: call(c)
                notes[label] = f"compiled in {seconds:.0f} s"
                outputs[label] = impls[label]()

        if args.onnx:
            try:
                from dalle3_fast.export.engine_unet import ORTUNet

                t0 = time.perf_counter()
                path = export_unet_onnx(unet, tmp / f"{name}.onnx", case["size"])
                engine = ORTUNet(path, like=unet, threads=torch.get_num_threads())
                impls["onnxruntime (our export)"] = lambda: engine(sample, t, tokens, lengths)
                notes["onnxruntime (our export)"] = f"exported in {time.perf_counter() - t0:.0f} s"
                outputs["onnxruntime (our export)"] = impls["onnxruntime (our export)"]()
            except Exception as exc:
                bench.add_skipped(op, shape, dtype, "onnxruntime (our export)",
                                  f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")

        reference = outputs.get(BASELINE_UNET, outputs["ours reference backend"])
        for label, out in outputs.items():
            notes[label] = "; ".join(n for n in (notes.get(label, ""), f"rel err {rel_err(out, reference):.1e}") if n)
        flops = step_flops(unet, sample, t, kv)
        print(f"  one step: {flops / 1e9:.2f} GFLOP (the 'of limit' column: that over the sgemm peak)")
        bench.compare(op, shape, dtype, impls, baseline=BASELINE_UNET, notes=notes, flops=flops)


def _with_backend(backend: str, fn):
    with ops.use_backend(backend):
        return fn()


def suite_unet(args, bench):
    cases = unet_cases()
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in cases]
    if unknown:
        raise SystemExit(f"run.py: unknown --shapes {', '.join(unknown)}; choose from {', '.join(cases)}")
    for name in wanted:
        bench_unet_case(bench, args, name, cases[name])


PIPELINE_PROMPTS = 16
PIPELINE_STEPS = 20
PIPELINE_GUIDANCE = 5.0


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes that spin on the CPU (pure Python loops: no memory traffic) while the block runs."""
    # Each stops by itself once its parent is gone, should this process be killed before the finally.
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # let them be scheduled before the first timed call
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def pipeline_prompts(n: int | None = None) -> list[str]:
    from dalle3_fast.eval.prompts import world_prompts

    return [p.prompt for p in world_prompts(n or PIPELINE_PROMPTS, seed=1)]


def suite_pipeline(args, bench):
    from dalle3_fast.pipeline import Dalle3Pipeline

    pipe = Dalle3Pipeline.from_pretrained(TINY_PIPELINE)
    prompts = pipeline_prompts()
    shape = f"tiny pipeline, {len(prompts)} prompts 64x64, {PIPELINE_STEPS} steps, CFG {PIPELINE_GUIDANCE:g}"
    op, dtype = "pipeline", torch.float32
    engine_pipe = None
    notes = {}

    def draw(p=pipe):
        return p(prompts, steps=PIPELINE_STEPS, guidance=PIPELINE_GUIDANCE, seed=0)

    impls = {BASELINE_PIPELINE: lambda: _with_backend("reference", draw), "ours": draw}
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            try:
                from dalle3_fast.export.engine_unet import use_unet_engine

                t0 = time.perf_counter()
                path = export_unet_onnx(pipe.unet, Path(tmp) / "unet.onnx", 64 // pipe.downsample_factor)
                engine_pipe = copy.copy(pipe)
                use_unet_engine(engine_pipe, path)
                impls["ours --unet-engine onnx"] = lambda: draw(engine_pipe)
                notes["ours --unet-engine onnx"] = f"U-Net exported in {time.perf_counter() - t0:.0f} s"
            except Exception as exc:
                bench.add_skipped(op, shape, dtype, "ours --unet-engine onnx",
                                  f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        start = len(bench.rows)
        for busy in args.busy:
            with busy_processes(busy):
                bench.compare(op, shape + (f", {busy} busy processes" if busy else ""), dtype, impls,
                              baseline=BASELINE_PIPELINE, notes=notes)
    for row in bench.rows[start:]:
        if row.ms is not None:
            rate = f"{len(prompts) / (row.ms / 1e3):.2f} images/s"
            row.note = "; ".join(n for n in (rate, row.note) if n)
            print(f"  {row.impl}: {rate}")
