"""TensorRT: build an engine from an exported ONNX file and run it on torch CUDA tensors.

    plan = build_engine("decoder.onnx", "decoder.plan", profile_shapes(spec, ...))
    outputs = TRTEngine("decoder.plan")(latents=..., noise_0=..., noise_1=...)
    (export.engine_decoder.TRTDecoder wraps a decoder engine as ``Dalle3Pipeline.decoder``.)

Needs the ``tensorrt`` Python package (``pip install tensorrt`` on a machine with CUDA) and a GPU. The ONNX file
is exported in the engine's dtype, so the network is built strongly typed: TensorRT keeps the file's types.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dalle3_fast.export.graphs import PartSpec

INSTALL_HINT = ("TensorRT is not available: install it with `pip install tensorrt` on a machine with an NVIDIA GPU "
                "and CUDA (https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html)")


def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built and run here, else why not (and how to fix it)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is visible to PyTorch; engines are built and run on a GPU"
    return None


def _trt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt

    return trt


def profile_shapes(spec: PartSpec, *, min_size, opt_size, max_size, max_batch: int, opt_batch: int = 1,
                   tokens: tuple[int, int, int] = (1, 77, 512)) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min shape, opt shape, max shape)} for an optimization profile, from the example inputs."""
    batches, sizes = (1, opt_batch, max_batch), (min_size, opt_size, max_size)
    shapes = {name: [] for name in spec.input_names}
    for batch, (w, h), L in zip(batches, sizes, tokens):
        inputs = spec.inputs(batch, w, h, tokens=L)
        for name in spec.input_names:
            shapes[name].append(tuple(inputs[name].shape))
    return {name: tuple(s) for name, s in shapes.items()}


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike,
                 shapes: dict[str, tuple[tuple[int, ...], ...]], *, workspace_gib: float = 8.0) -> Path:
    """Parse ``onnx_path``, build a strongly typed engine with one optimization profile, write it atomically."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT >= 9
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2 ** 30))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    return plan_path


class TRTEngine:
    """A deserialized engine; ``__call__(**tensors)`` runs it on CUDA tensors and returns its outputs."""

    def __init__(self, plan_path: str | os.PathLike):
        trt = _trt()
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path} is not a TensorRT engine for this TensorRT version and GPU; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        pairs = (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                 ("int32", torch.int32), ("int64", torch.int64), ("bool", torch.bool))
        table = {getattr(trt, name): dtype for name, dtype in pairs if hasattr(trt, name)}
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"TRTEngine: missing inputs {sorted(missing)}; the engine takes {self.input_names}")
        keep = []
        for name in self.input_names:
            t = inputs[name].to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log above)")
        return outputs
