"""Text -> image: the assembled pipeline (text encoder, U-Net, VAE, latent decoder, upsampler).

A pipeline directory (like diffusers' model_index.json) names its parts::

    DIR/model_index.json     {"text_encoder": "text_encoder", "unet": "unet", "vae": "vae",
                              "decoder": "decoder" | null, "upsampler": "upsampler" | null,
                              "scheduler": {...}, "prediction_type": ..., "defaults": {...}, "sizes": [...]}
    DIR/text_encoder/        T5 (transformers format) + tokenizer/
    DIR/unet/ DIR/vae/ DIR/decoder/   diffusers-format model directories

    pipe = Dalle3Pipeline.from_pretrained(DIR)
    out = pipe("a red circle above a blue square", size="64x64", steps=20, guidance=5.0, seed=0)
    out.images[0].save("out.png"); print(out.revised_prompts[0], out.timings)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dalle3_fast.diffusion import (Denoiser, NoiseSchedule, cfg_model_fn, decode_consistency, get_sampler, initial_noise,
                                   sampling_sigmas)
from dalle3_fast.diffusion.guidance import concat_conditions
from dalle3_fast.io import CheckpointError, atomic_write_bytes, read_config
from dalle3_fast.models.latent_decoder import LatentDecoder
from dalle3_fast.models.unet import UNet, pooled_text_embeds, size_time_ids

MODEL_INDEX = "model_index.json"
DEFAULTS = {"size": "64x64", "steps": 20, "guidance": 5.0, "sampler": "dpmpp_2m", "decoder": "vae"}
DECODERS = ("vae", "consistency")


class PipelineError(ValueError):
    """A request the pipeline cannot serve as asked (bad size, steps, decoder...)."""


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    revised_prompts: list[str]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """"WxH" or (W, H) -> (W, H)."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = size
    else:
        try:
            w, h = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            raise PipelineError(f"size {size!r} is not of the form WIDTHxHEIGHT (e.g. 1024x1024)") from None
    if w <= 0 or h <= 0:
        raise PipelineError(f"size {size!r} must be positive")
    return int(w), int(h)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def from_pil(images: Sequence[Image.Image], device=None, dtype=torch.float32) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) in [-1, 1]."""
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(device=device, dtype=dtype).contiguous()


class Dalle3Pipeline:
    def __init__(self, text_encoder, unet: UNet, vae, *, decoder=None, upsampler=None,
                 schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                 defaults: dict | None = None, sizes: Sequence[str] | None = None):
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.decoder, self.upsampler = decoder, upsampler
        self.schedule = schedule or NoiseSchedule()
        self.prediction_type = prediction_type
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.sizes = list(sizes or [self.defaults["size"]])
        self.unet_engine = None  # an export.EngineUNet that runs every denoising step instead of self.unet

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory, *, device="cpu", dtype: torch.dtype = torch.float32) -> "Dalle3Pipeline":
        from dalle3_fast.models.text_encoder import T5TextEncoder
        from dalle3_fast.models.vae import AutoencoderKL

        directory = Path(directory)
        index = read_config(directory, MODEL_INDEX)
        for part in ("text_encoder", "unet", "vae"):
            if not index.get(part):
                raise CheckpointError(f"{directory / MODEL_INDEX} names no {part!r}; a pipeline needs text_encoder, "
                                      "unet and vae")
        from dalle3_fast.upsample import LocalUpsampler

        def part(name, loader):
            if not index.get(name):
                return None
            if not isinstance(index[name], str):
                raise CheckpointError(f"{directory / MODEL_INDEX}: {name!r} must name a sub-directory, got {index[name]!r}")
            try:
                return loader(directory / index[name])
            except CheckpointError:
                raise
            except (ValueError, TypeError, KeyError, OSError) as exc:  # e.g. a config the model refuses
                detail = " ".join(str(exc).split()) or type(exc).__name__
                raise CheckpointError(f"the {name} in {str(directory / index[name])!r} cannot be loaded: "
                                      f"{detail}") from exc

        parts = {name: part(name, loader) for name, loader in (
            ("text_encoder", T5TextEncoder.from_pretrained), ("unet", UNet.from_pretrained),
            ("vae", AutoencoderKL.from_pretrained), ("decoder", LatentDecoder.from_pretrained),
            ("upsampler", LocalUpsampler.from_pretrained))}
        try:
            pipe = cls(parts["text_encoder"], parts["unet"], parts["vae"], decoder=parts["decoder"],
                       upsampler=parts["upsampler"], schedule=NoiseSchedule.from_config(index.get("scheduler", {})),
                       prediction_type=index.get("prediction_type", "epsilon"),
                       defaults=index.get("defaults"), sizes=index.get("sizes"))
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{directory / MODEL_INDEX} is not a valid pipeline index: {exc}") from exc
        return pipe.to(device, dtype)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        if self.decoder is not None:
            self.decoder.save_pretrained(directory / "decoder")
        if self.upsampler is not None:
            self.upsampler.save_pretrained(directory / "upsampler")
        index = {
            "_class_name": "Dalle3Pipeline", "text_encoder": "text_encoder", "tokenizer": "text_encoder/tokenizer",
            "unet": "unet", "vae": "vae",
            "decoder": "decoder" if self.decoder is not None else None,
            "upsampler": "upsampler" if self.upsampler is not None else None,
            "scheduler": self.schedule.config(), "prediction_type": self.prediction_type,
            "defaults": self.defaults, "sizes": self.sizes,
        }
        atomic_write_bytes(directory / MODEL_INDEX, (json.dumps(index, indent=2) + "\n").encode())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Dalle3Pipeline":
        for model in self._models():
            model.to(device=device)
        if dtype is not None:
            for model in (self.unet, self.vae, self.decoder):
                if model is not None:
                    model.to(dtype=dtype)
        for model in self._models():
            model.eval()
        return self

    def _models(self):
        return [m for m in (self.text_encoder, self.unet, self.vae, self.decoder) if m is not None]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downsample_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: the VAE's downsampling times the U-Net's."""
        return self.downsample_factor * self.unet.config.downsample_factor

    # ------------------------------------------------------------------ checks
    def check_size(self, size) -> tuple[int, int]:
        w, h = parse_size(size)
        multiple = self.size_multiple
        if w % multiple or h % multiple:
            raise PipelineError(f"size {w}x{h} is not a multiple of {multiple} in both sides (VAE x{self.downsample_factor}"
                                f" and the U-Net's downsampling); try {self.sizes[0]}")
        return w, h

    @staticmethod
    def check_steps(steps) -> int:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise PipelineError(f"steps={steps!r} must be an integer >= 1")
        return steps

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, truncate: bool = True):
        tokens, lengths = self.text_encoder.encode(list(prompts), truncate=truncate)
        return tokens.to(device=self.device, dtype=self.dtype), lengths.to(self.device)

    def _net(self, tokens: torch.Tensor, lengths: torch.Tensor, width: int, height: int) -> Callable:
        """``net(x_vp, t)``: the U-Net with the prompt's cross-attention K/V computed once, or the U-Net engine."""
        added = None
        if self.unet.size_conditioned:
            added = {"text_embeds": pooled_text_embeds(tokens, lengths),
                     "time_ids": size_time_ids(tokens.shape[0], (height, width), (0, 0), (height, width),
                                               device=tokens.device, dtype=tokens.dtype)}
        if self.unet_engine is not None:
            engine, time_ids = self.unet_engine, None if added is None else added["time_ids"]

            def engine_net(x, t):
                return engine(x, t, tokens, lengths, time_ids)

            return engine_net
        kv = self.unet.precompute_text_kv(tokens, lengths)

        def net(x, t):
            return self.unet(x, t.to(x.device), text_kv=kv, added_cond_kwargs=added)

        return net

    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], *, negative_prompts: Sequence[str] | None = None,
                         width: int, height: int, steps: int, guidance: float, seeds: Sequence[int],
                         sampler: str | None = None, init_latents: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, callback=None, truncate: bool = True,
                         timings: dict | None = None) -> torch.Tensor:
        """Scaled latents (B, C, H/f, W/f) for ``prompts``; one seed per prompt, so a batch equals single calls.

        Inpainting: ``init_latents`` (B, C, h, w) scaled latents of the known image and ``mask`` (B, 1, h, w),
        1 where the image is to be repainted; the known region is replaced by the original at every step.
        ``timings``, when given, receives ``text_encoder_s`` (prompt and negative-prompt encoding).
        The loop runs under ``torch.inference_mode`` (less bookkeeping per op than no_grad); the latents
        returned are ordinary tensors.
        """
        with torch.inference_mode():
            latents = self._generate_latents(prompts, negative_prompts=negative_prompts, width=width, height=height,
                                             steps=steps, guidance=guidance, seeds=seeds, sampler=sampler,
                                             init_latents=init_latents, mask=mask, callback=callback,
                                             truncate=truncate, timings=timings)
        return latents.clone()

    def _generate_latents(self, prompts, *, negative_prompts, width, height, steps, guidance, seeds, sampler,
                          init_latents, mask, callback, truncate, timings) -> torch.Tensor:
        prompts = list(prompts)
        if len(seeds) != len(prompts):
            raise PipelineError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        sample = get_sampler(sampler or self.defaults["sampler"])
        negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        f = self.downsample_factor
        shape = (self.unet.in_channels, height // f, width // f)
        sigmas = sampling_sigmas(self.schedule, self.check_steps(steps))
        x = torch.cat([initial_noise((1, *shape), float(sigmas[0]), generator=torch.Generator().manual_seed(int(s)),
                                     device=self.device, dtype=self.dtype) for s in seeds])
        t0 = time.perf_counter()
        tokens, lengths = self.encode_prompts(prompts, truncate=truncate)
        if guidance == 1:
            net = self._net(tokens, lengths, width, height)
        else:
            u_tokens, u_lengths = self.encode_prompts(negative, truncate=truncate)
            both = concat_conditions({"tokens": u_tokens, "lengths": u_lengths}, {"tokens": tokens, "lengths": lengths})
            net = self._net(both["tokens"], both["lengths"], width, height)
        if timings is not None:
            timings["text_encoder_s"] = time.perf_counter() - t0
        model_fn = cfg_model_fn(Denoiser(net, self.schedule, self.prediction_type), {}, {}, guidance)
        if init_latents is not None:
            if mask is None:
                raise PipelineError("inpainting needs both `init_latents` and `mask`")
            known, keep = init_latents.to(x), (1 - mask).to(x)
            guided = model_fn

            def model_fn(x, sigma):  # noqa: F811
                return guided(x, sigma) * (1 - keep) + known * keep

            x = x * (1 - keep) + (known + float(sigmas[0]) * x / (float(sigmas[0]) ** 2 + 1) ** 0.5) * keep
        return sample(model_fn, x, sigmas, callback=callback)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, decoder: str = "vae", seeds: Sequence[int] | None = None,
               steps: int = 2) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], by the VAE decoder or the 2-step consistency decoder."""
        z = self.vae.unscale_latents(latents)
        if decoder == "vae":
            return self.vae.decode(z)
        if decoder != "consistency":
            raise PipelineError(f"decoder {decoder!r} is unknown; use one of {', '.join(DECODERS)}")
        if self.decoder is None:
            raise PipelineError("this pipeline has no latent decoder; use decoder='vae'")
        seeds = list(seeds) if seeds is not None else [0] * latents.shape[0]
        # a LatentDecoder network runs on the shared consistency sampler; an exported engine
        # (export.engine_decoder) holds sampler and network in one graph and decodes itself
        decode = (partial(decode_consistency, self.decoder) if isinstance(self.decoder, LatentDecoder)
                  else self.decoder.decode)
        return torch.cat([decode(z[i:i + 1], generator=torch.Generator().manual_seed(int(s) + 1),
                                 num_inference_steps=steps) for i, s in enumerate(seeds)])

    def revise(self, prompts: Sequence[str], upsampler=None) -> list[str]:
        """The revised (upsampled) prompts: ``upsampler.upsample(prompts)``; unchanged without one."""
        return list(upsampler.upsample(list(prompts))) if upsampler is not None else list(prompts)

    # ------------------------------------------------------------------ text -> image
    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 size=None, steps: int | None = None, guidance: float | None = None, seed: int = 0, n: int = 1,
                 sampler: str | None = None, decoder: str | None = None, upsampler=None,
                 callback=None, truncate: bool = True) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise PipelineError("prompt must be a non-empty string (or a list of them)")
        if not isinstance(n, int) or n < 1:
            raise PipelineError(f"n={n!r} must be an integer >= 1")
        width, height = self.check_size(size or self.defaults["size"])
        steps = self.check_steps(steps if steps is not None else self.defaults["steps"])
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
        decoder = decoder or self.defaults["decoder"]
        if decoder not in DECODERS:
            raise PipelineError(f"decoder {decoder!r} is unknown; use one of {', '.join(DECODERS)}")
        if decoder == "consistency" and self.decoder is None:
            raise PipelineError("this pipeline has no latent decoder; use decoder='vae'")
        timings = {}
        t0 = time.perf_counter()
        revised = self.revise(prompts, upsampler)
        timings["upsample_s"] = time.perf_counter() - t0
        revised = [p for p in revised for _ in range(n)]
        seeds = [seed + i for i in range(len(revised))]
        if negative_prompt is None:
            negatives = None
        else:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise PipelineError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            negatives = [p for p in negatives for _ in range(n)]
        t0 = time.perf_counter()
        latents = self.generate_latents(revised, negative_prompts=negatives, width=width, height=height, steps=steps,
                                        guidance=guidance, seeds=seeds, sampler=sampler, callback=callback,
                                        truncate=truncate, timings=timings)
        timings["denoise_s"] = time.perf_counter() - t0 - timings["text_encoder_s"]
        t0 = time.perf_counter()
        images = self.decode(latents, decoder=decoder, seeds=seeds)
        timings["decode_s"] = time.perf_counter() - t0
        return PipelineOutput(to_pil(images), revised, seeds, timings)
