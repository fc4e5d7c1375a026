"""The modules that become ONNX graphs: one forward per exported part, tensors in and out only.

    decoder       TwoStepDecoderGraph   latents (B, C, h, w) unscaled, noise_0, noise_1 (B, 3, H, W) -> images
                                        both consistency steps unrolled; H, W = f*h, f*w
    unet          UNetGraph             sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, L, D),
                                        encoder_lengths (B,) int32 [, time_ids (B, 6)] -> prediction (B, C, h, w)
    vae-decoder   VAEDecoderGraph       latents (B, C, h, w) unscaled -> images (B, 3, H, W)

``PartSpec`` carries what export, verification and the TensorRT profile need: input names, example
inputs at a given image size and batch, and the dynamic dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dalle3_fast.diffusion import consistency_sigmas, decoder_schedule, decoder_timesteps, edm_scalings

PARTS = ("decoder", "unet", "vae-decoder")
EXAMPLE_TOKENS = 16


class TwoStepDecoderGraph(nn.Module):
    """``decode_consistency(decoder, z, noise=[noise_0, noise_1])`` (2 steps) unrolled into one graph.

    The steps are ``sample_consistency``'s on ``decoder_denoiser``; their sigmas and EDM scalings come from the
    shared schedule once and become float32 scalar constants, so the graph holds no float64 and no table lookups.
    """

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder
        T = decoder.num_train_timesteps
        self.timesteps = decoder_timesteps(2, T)
        sigmas = consistency_sigmas(decoder_schedule(T), self.timesteps)[:2]
        c_skip, c_out, c_in = edm_scalings(sigmas, decoder.sigma_data)
        self.steps = [{"sigma": float(sigmas[i]), "c_skip": float(c_skip[i]), "c_out": float(c_out[i]),
                       "c_in": float(c_in[i]), "t": t} for i, t in enumerate(self.timesteps)]

    def forward(self, latents: torch.Tensor, noise_0: torch.Tensor, noise_1: torch.Tensor) -> torch.Tensor:
        cond = self.decoder.condition(latents).to(noise_0.dtype)
        first, second = self.steps
        x0 = self._denoise(first["sigma"] * noise_0, cond, first)
        return self._denoise(x0 + second["sigma"] * noise_1, cond, second)

    def _denoise(self, x, cond, step: dict) -> torch.Tensor:
        return step["c_skip"] * x + step["c_out"] * self.decoder(x * step["c_in"], step["t"], cond)


class UNetGraph(nn.Module):
    """One U-Net evaluation on explicit text tokens and lengths (no precomputed K/V: one graph per step)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.size_conditioned = unet.size_conditioned

    def forward(self, sample, timestep, encoder_hidden_states, encoder_lengths, time_ids=None):
        added = None
        if self.size_conditioned:
            from dalle3_fast.models.unet import pooled_text_embeds

            added = {"text_embeds": pooled_text_embeds(encoder_hidden_states, encoder_lengths), "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, encoder_lengths=encoder_lengths,
                         added_cond_kwargs=added)


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


@dataclass
class PartSpec:
    """An exportable part: its module, I/O names, example inputs and dynamic dimensions."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[..., dict[str, torch.Tensor]]  # (batch, W, H, gen, tokens)
    dynamic_axes: dict[str, dict[int, str]]      # input -> {axis: symbolic name}, for TensorRT profiles and docs
    latent_factor: int                           # image pixels per latent
    dtype: torch.dtype

    def inputs(self, batch: int, width: int, height: int, seed: int = 0,
               tokens: int = EXAMPLE_TOKENS) -> dict[str, torch.Tensor]:
        """Random inputs for ``batch`` images of ``width`` x ``height`` (``tokens`` text tokens for the U-Net)."""
        return self.make_inputs(batch, width, height, torch.Generator().manual_seed(seed), tokens)

    def dynamic_shapes(self, max_batch: int, min_size: tuple[int, int], max_size: tuple[int, int]) -> dict:
        """torch.export dynamic_shapes: batch in [1, max_batch]; latent h, w between the sizes' latents."""
        f = self.latent_factor
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        h = torch.export.Dim("h", min=max(min_size[1] // f, 2), max=max_size[1] // f)
        w = torch.export.Dim("w", min=max(min_size[0] // f, 2), max=max_size[0] // f)
        tokens = torch.export.Dim("tokens", min=2, max=512)
        dims = {"batch": batch, "h": h, "w": w, "H": f * h, "W": f * w, "tokens": tokens}
        return {name: {axis: dims[sym] for axis, sym in self.dynamic_axes[name].items()} for name in self.input_names}


def _randn(gen, shape, dtype):
    return torch.randn(shape, generator=gen).to(dtype)


def decoder_spec(pipe, dtype: torch.dtype) -> PartSpec:
    if pipe.decoder is None:
        raise ValueError("--part decoder: this pipeline has no latent decoder (model_index.json names none); "
                         "export --part vae-decoder instead")
    decoder = pipe.decoder
    f, C = decoder.config.latent_upsample_factor, decoder.config.latent_channels

    def make(batch, width, height, gen, tokens):
        return {"latents": _randn(gen, (batch, C, height // f, width // f), dtype),
                "noise_0": _randn(gen, (batch, 3, height, width), dtype),
                "noise_1": _randn(gen, (batch, 3, height, width), dtype)}

    image_axes = {0: "batch", 2: "H", 3: "W"}
    return PartSpec("decoder", TwoStepDecoderGraph(decoder).eval(), ["latents", "noise_0", "noise_1"], ["images"],
                    make, {"latents": {0: "batch", 2: "h", 3: "w"}, "noise_0": image_axes, "noise_1": image_axes},
                    f, dtype)


def unet_spec(pipe, dtype: torch.dtype) -> PartSpec:
    unet = pipe.unet
    f, C, D = pipe.downsample_factor, unet.in_channels, unet.text_dim
    names = ["sample", "timestep", "encoder_hidden_states", "encoder_lengths"]
    axes = {"sample": {0: "batch", 2: "h", 3: "w"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "tokens"}, "encoder_lengths": {0: "batch"}}
    if unet.size_conditioned:
        names.append("time_ids")
        axes["time_ids"] = {0: "batch"}

    def make(batch, width, height, gen, L):
        inputs = {"sample": _randn(gen, (batch, C, height // f, width // f), dtype),
                  "timestep": torch.rand(batch, generator=gen) * 999,
                  "encoder_hidden_states": _randn(gen, (batch, L, D), dtype),
                  "encoder_lengths": torch.randint(1, L + 1, (batch,), generator=gen, dtype=torch.int32)}
        if unet.size_conditioned:
            inputs["time_ids"] = torch.tensor([height, width, 0, 0, height, width], dtype=dtype).repeat(batch, 1)
        return inputs

    return PartSpec("unet", UNetGraph(unet).eval(), names, ["prediction"], make, axes, f, dtype)


def vae_decoder_spec(pipe, dtype: torch.dtype) -> PartSpec:
    f, C = pipe.downsample_factor, pipe.vae.config.latent_channels

    def make(batch, width, height, gen, tokens):
        return {"latents": _randn(gen, (batch, C, height // f, width // f), dtype)}

    return PartSpec("vae-decoder", VAEDecoderGraph(pipe.vae).eval(), ["latents"], ["images"], make,
                    {"latents": {0: "batch", 2: "h", 3: "w"}}, f, dtype)


def part_spec(pipe, part: str, dtype: torch.dtype = torch.float32) -> PartSpec:
    """The ``PartSpec`` of ``part`` (one of PARTS) of a loaded ``Dalle3Pipeline`` already cast to ``dtype``."""
    builders = {"decoder": decoder_spec, "unet": unet_spec, "vae-decoder": vae_decoder_spec}
    if part not in builders:
        raise ValueError(f"part {part!r} is unknown; use one of {', '.join(PARTS)}")
    return builders[part](pipe, dtype)
