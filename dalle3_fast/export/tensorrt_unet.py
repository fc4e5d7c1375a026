"""The denoising loop's U-Net as a TensorRT engine (a plan built by ``python -m dalle3_fast.export --part unet
--onnx unet.onnx --tensorrt unet.plan``); needs the ``tensorrt`` package and a GPU, as export/tensorrt.py."""
from __future__ import annotations

import os

import torch

from dalle3_fast.export.engine_unet import EngineUNet
from dalle3_fast.export.tensorrt import TRTEngine


class TRTUNet(EngineUNet):
    """``EngineUNet`` on a deserialized TensorRT plan; inputs go to CUDA in the engine's dtypes."""

    def __init__(self, plan_path: str | os.PathLike, *, like):
        super().__init__(plan_path, like)
        self.engine = TRTEngine(self.path)
        shapes = {n: list(self.engine.engine.get_tensor_shape(n)) for n in self.engine.input_names}
        self._check_io(self.engine.input_names, {n: [d if d >= 0 else None for d in s] for n, s in shapes.items()})
        if len(self.engine.output_names) != 1:
            raise ValueError(f"{self.path} has outputs {self.engine.output_names}; a U-Net step has one (prediction)")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**feeds)[self.engine.output_names[0]]
