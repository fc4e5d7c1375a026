"""The denoising loop's U-Net backed by an exported one-step graph (``python -m dalle3_fast.export --part unet``).

    use_unet_engine(pipe, Path("unet.onnx"))     # onnxruntime, CPU
    use_unet_engine(pipe, Path("unet.plan"))     # TensorRT, CUDA (TRTUNet)
    out = pipe(prompts)                           # every denoising step runs the engine

The engine takes what the exported ``UNetGraph`` takes (sample, timestep, encoder_hidden_states,
encoder_lengths [, time_ids]) and returns the prediction, so the sampler, guidance and seeds are the
pipeline's own and the images equal the PyTorch path's up to the engine's numerics. The PyTorch U-Net
stays loaded (its config, device and dtype describe the model); only the step runs elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dalle3_fast.export.tensorrt import TRTEngine

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "encoder_lengths")
ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".plan", ".engine", ".trt")
EXPORT_HINT = "export one with `python -m dalle3_fast.export --part unet --onnx unet.onnx [--tensorrt unet.plan]`"


class EngineUNet:
    """Base: subclasses implement ``run(feeds) -> prediction`` on a dict of torch tensors named as UNET_INPUTS."""

    def __init__(self, path: Path, like):
        self.path = Path(path)
        self.in_channels = like.in_channels
        self.text_dim = like.text_dim
        self.size_conditioned = like.size_conditioned
        self.input_names = list(UNET_INPUTS) + (["time_ids"] if self.size_conditioned else [])

    def _check_io(self, names: list[str], shapes: dict[str, list]) -> None:
        """The file is a U-Net export that fits ``like``: input names, channel and token widths."""
        if sorted(names) != sorted(self.input_names):
            raise ValueError(f"{self.path} is not an export of this pipeline's U-Net (its inputs are "
                             f"{', '.join(names)}; expected {', '.join(self.input_names)}); {EXPORT_HINT}")
        for name, axis, want in (("sample", 1, self.in_channels), ("encoder_hidden_states", 2, self.text_dim)):
            dims = shapes.get(name) or []
            have = dims[axis] if len(dims) > axis else None
            if isinstance(have, int) and have != want:
                raise ValueError(f"{self.path} was exported from another U-Net: input {name!r} has {have} at axis "
                                 f"{axis}, this pipeline's U-Net takes {want}; {EXPORT_HINT}")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_lengths: torch.Tensor, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step: the prediction (B, C, h, w) in ``sample``'s dtype and device."""
        B = sample.shape[0]
        feeds = {"sample": sample, "timestep": timestep.reshape(-1).float().expand(B),
                 "encoder_hidden_states": encoder_hidden_states, "encoder_lengths": encoder_lengths.to(torch.int32)}
        if self.size_conditioned:
            if time_ids is None:
                raise ValueError("this U-Net is size-conditioned: the engine needs `time_ids`")
            feeds["time_ids"] = time_ids
        return self.run(feeds).to(device=sample.device, dtype=sample.dtype)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class ORTUNet(EngineUNet):
    """The exported U-Net step run by onnxruntime (CPU execution provider), ``threads`` intra-op threads
    (default: PyTorch's thread count, so ``--threads`` and ``torch.set_num_threads`` apply to it too)."""

    def __init__(self, onnx_path: str | os.PathLike, *, like, threads: int | None = None):
        from dalle3_fast.export.onnx_export import onnx_session

        super().__init__(Path(onnx_path), like)
        try:
            self.session = onnx_session(self.path, threads or torch.get_num_threads())
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            detail = " ".join(str(exc).split())[:160]
            raise ValueError(f"{self.path} is not an ONNX model onnxruntime can load ({detail}); {EXPORT_HINT}") \
                from None
        inputs = self.session.get_inputs()
        self._check_io([i.name for i in inputs], {i.name: list(i.shape) for i in inputs})
        self._types = {i.name: _ORT_TYPES.get(i.type) for i in inputs}
        unknown = [f"{n}: {i.type}" for n, i in zip(self._types, inputs) if self._types[n] is None]
        if unknown:
            raise ValueError(f"{self.path}: input types {', '.join(unknown)} are not supported; {EXPORT_HINT}")

    def run(self, feeds):
        arrays = {k: v.detach().cpu().numpy().astype(self._types[k], copy=False) for k, v in feeds.items()}
        return torch.from_numpy(self.session.run(None, arrays)[0])


class TRTUNet(EngineUNet):
    """``EngineUNet`` on a deserialized TensorRT plan (built by ``python -m dalle3_fast.export --part unet
    --onnx unet.onnx --tensorrt unet.plan``); inputs go to CUDA in the engine's dtypes. Needs the
    ``tensorrt`` package and a GPU, as export/tensorrt.py."""

    def __init__(self, plan_path: str | os.PathLike, *, like):
        super().__init__(plan_path, like)
        self.engine = TRTEngine(self.path)
        shapes = {n: list(self.engine.engine.get_tensor_shape(n)) for n in self.engine.input_names}
        self._check_io(self.engine.input_names, {n: [d if d >= 0 else None for d in s] for n, s in shapes.items()})
        if len(self.engine.output_names) != 1:
            raise ValueError(f"{self.path} has outputs {self.engine.output_names}; a U-Net step has one (prediction)")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**feeds)[self.engine.output_names[0]]


def load_unet_engine(path: str | os.PathLike, *, like) -> EngineUNet:
    """The engine in ``path`` for a U-Net like ``like``: .onnx -> onnxruntime, .plan/.engine/.trt -> TensorRT.

    Raises FileNotFoundError or ValueError with one line naming the problem and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--unet-engine {path}: no such file; {EXPORT_HINT}")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        try:
            return ORTUNet(path, like=like)
        except ValueError as exc:
            raise ValueError(f"--unet-engine {exc}") from None
    if suffix in TENSORRT_SUFFIXES:
        try:
            return TRTUNet(path, like=like)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"--unet-engine {path}: {' '.join(str(exc).split())}") from None
    raise ValueError(f"--unet-engine {path}: unknown engine type {suffix or '(no suffix)'!r}; give an .onnx file "
                     f"(onnxruntime) or a TensorRT plan ({', '.join(TENSORRT_SUFFIXES)}); {EXPORT_HINT}")


def use_unet_engine(pipe, path: str | os.PathLike) -> None:
    """Make every denoising step of ``pipe`` run the exported U-Net in ``path`` (see ``load_unet_engine``)."""
    pipe.unet_engine = load_unet_engine(path, like=pipe.unet)
