"""ONNX export of a ``PartSpec`` and its verification with onnxruntime.

The fused ops (``dalle3_fast::group_norm_silu_fwd``, ``dalle3_fast::attention_fwd``) are custom torch ops that
no ONNX runtime knows. Export runs under ``ops.use_backend("reference")``: every op is then its plain-PyTorch
reference (a decomposition, not a custom_translation_table), which the dynamo exporter lowers to standard
opset-19 nodes: GroupNorm+SiLU as Reshape/InstanceNormalization/Reshape, Mul/Add (affine, modulation) and
Sigmoid*Mul; attention as MatMul/Softmax with Where for the key-length mask. onnxruntime and TensorRT run the
file with no plugin.

The program is captured with ``torch.export.export(strict=False)`` and handed to ``torch.onnx.export``
(dynamo=True, the default exporter), so a dimension that the model specialises is an error, never a silent
static graph.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dalle3_fast import ops
from dalle3_fast.export.graphs import EXAMPLE_TOKENS, PartSpec

DEFAULT_OPSET = 19
# ||ort - torch|| / ||torch|| accepted per export dtype (fp32 is the 1e-3 bound).
TOLERANCES = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def export_onnx(spec: PartSpec, path: str | os.PathLike, *, opt_size: tuple[int, int], min_size: tuple[int, int],
                max_size: tuple[int, int], max_batch: int = 16, opset: int = DEFAULT_OPSET,
                example_batch: int = 2) -> Path:
    """Write ``spec``'s graph to ``path`` (atomically) with dynamic batch, spatial dims (and token count)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(spec.module.parameters()).device
    inputs = {k: v.to(device) for k, v in spec.inputs(example_batch, *opt_size).items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    try:
        with ops.use_backend("reference"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on merged axis names
            # torch.export first, so a dimension the code specialises fails here instead of the ONNX exporter
            # quietly falling back to a static trace.
            program = torch.export.export(spec.module, (), kwargs=inputs, strict=False,
                                          dynamic_shapes=spec.dynamic_shapes(max_batch, min_size, max_size))
            torch.onnx.export(program, (), tmp, kwargs=inputs, input_names=spec.input_names,
                              output_names=spec.output_names, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        check_dynamic_axes(spec, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_dynamic_axes(spec: PartSpec, path) -> None:
    """Every axis ``spec`` marks dynamic is symbolic in the file's inputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis in spec.dynamic_axes.get(inp.name, {}):
            if dims[axis].HasField("dim_value"):
                raise RuntimeError(f"export produced a static axis {axis} ({dims[axis].dim_value}) for input "
                                   f"{inp.name!r}; the model specialised a dimension that should be dynamic")


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` with full shape inference; raises ``onnx.checker.ValidationError``."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(out.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(spec: PartSpec, path: str | os.PathLike, sizes: list[tuple[int, int]], batches: list[int],
                seed: int = 0, session=None) -> list[dict]:
    """Run the ONNX file with onnxruntime (CPU) and ``spec.module`` in PyTorch on the same random inputs.

    One row per (size, batch): {"size", "batch", "rel_err", "ort_ms", "torch_ms"}. PyTorch runs on its default
    (fused) backend, so the comparison also covers the reference decomposition against the kernels.
    """
    session = session or onnx_session(path)
    rows = []
    for i, ((w, h), b) in enumerate(zip(sizes, batches)):
        inputs = spec.inputs(b, w, h, seed=seed + i, tokens=EXAMPLE_TOKENS + 8 * i)  # token count varies too
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = spec.module(**inputs).float().numpy()
        t1 = time.perf_counter()
        try:
            out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        except Exception as exc:  # onnxruntime's own exception types: a missing kernel for this dtype, say
            raise RuntimeError(f"onnxruntime could not run {path} at {w}x{h} batch {b}: {exc}") from exc
        t2 = time.perf_counter()
        if out.shape != ref.shape:
            raise AssertionError(f"onnxruntime output shape {out.shape} differs from PyTorch's {ref.shape}")
        rows.append({"size": f"{w}x{h}", "batch": b, "rel_err": relative_error(np.asarray(out, np.float32), ref),
                     "torch_ms": 1e3 * (t1 - t0), "ort_ms": 1e3 * (t2 - t1)})
    return rows
