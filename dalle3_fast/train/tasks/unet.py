"""Task ``unet``: the latent diffusion U-Net on blended captions (DALL-E 3's recipe).

Per micro-batch (at load time, seeded by position): each caption is the synthetic one (DSC) with
probability ``synthetic_ratio`` else the original alt-text, then dropped to "" with probability
``caption_drop`` for classifier-free guidance. Images -> frozen VAE latents (scaled); captions ->
T5 tokens; epsilon- or v-prediction MSE at a uniform timestep, optionally min-SNR weighted.

The T5 encoder is frozen, or with ``train_text_encoder`` trained jointly with the U-Net (what small
text-to-image models do when no pretrained T5 fits): then the trained module is a
:class:`UNetWithTextEncoder`, so the optimizer, EMA and checkpoints hold the encoder too, sampling
uses the (EMA) trained encoder, and export writes it to ``final/text_encoder`` beside the U-Net.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dalle3_fast.diffusion import (Denoiser, NoiseSchedule, cfg_model_fn, diffusion_loss, initial_noise,
                                   sample_dpmpp_2m, sampling_sigmas)
from dalle3_fast.io import CheckpointError, write_config
from dalle3_fast.models.unet import UNet, pooled_text_embeds, size_time_ids

from ..task import Task, register_task
from .captions import blend_captions
from .frozen import freeze, load_frozen_vae
from .image_data import ImageDataOptions, image_batches, to_unit, world_captions

SCHEDULER_CONFIG = "scheduler_config.json"
TEXT_ENCODER_DIR = "text_encoder"  # under the export directory, with train_text_encoder


def build_tiny_text_encoder(directory: Path, width: int, seed: int, vocab_size: int, scenes: int):
    """A frozen tiny T5 over a tokenizer trained on scene-world captions, saved to ``directory``."""
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer

    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    if main and not (directory / "config.json").is_file():
        tokenizer = SentencePieceTokenizer.train(world_captions(seed, scenes), vocab_size=vocab_size)
        with torch.random.fork_rng():
            T5TextEncoder.tiny(tokenizer, d_model=width, seed=seed).save_pretrained(directory)
    if dist.is_initialized():
        dist.barrier()  # the other ranks load what rank 0 wrote
    return T5TextEncoder.from_pretrained(directory)


class UNetWithTextEncoder(nn.Module):
    """The U-Net and the T5 encoder trained with it. The encoder always runs in eval mode: it trains
    without dropout (whatever its config's dropout_rate), so the loss sees the function sampling uses."""

    def __init__(self, unet: UNet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        return self


@register_task("unet")
class UNetTask(Task):
    @dataclass
    class Options(ImageDataOptions):
        model: str = "tiny"              # a named U-Net config (tiny, sd15, sdxl, dalle3-t5) or a directory
        vae: str = ""                    # trained VAE directory (required)
        text_encoder: str = "tiny"       # T5 directory, or "tiny": a new random tiny T5 saved to OUT/text_encoder
        # train that T5 with the U-Net (no dropout) instead of keeping it frozen; export adds final/text_encoder
        train_text_encoder: bool = False
        tokenizer_vocab: int = 1000      # for text_encoder "tiny"
        tokenizer_scenes: int = 2000     # scene-world scenes whose captions train that tokenizer
        prediction_type: str = "epsilon"  # epsilon | v_prediction
        beta_schedule: str = "scaled_linear"
        beta_start: float = 0.00085
        beta_end: float = 0.012
        num_train_timesteps: int = 1000
        min_snr_gamma: float = 0.0       # 0: plain MSE; else Min-SNR-gamma weighting (5 is the paper's value)
        synthetic_ratio: float = 0.95    # DALL-E 3: 95 % synthetic captions
        synthetic_key: str = "dsc"
        original_key: str = "alt"
        caption_drop: float = 0.1        # empty caption for classifier-free guidance
        latent_reuse: int = 1            # optimizer steps each encoded image batch serves (fresh noise, t, captions)
        sample_prompts: list[str] = field(default_factory=list)  # default: held-out DSC captions
        sample_count: int = 4
        sample_steps: int = 20
        guidance_scale: float = 5.0

    def build_model(self) -> nn.Module:
        o = self.options
        if o.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"task_options.prediction_type={o.prediction_type!r}; use epsilon or v_prediction")
        if o.latent_reuse < 1:
            raise ValueError(f"task_options.latent_reuse must be >= 1, got {o.latent_reuse}")
        for name in ("synthetic_ratio", "caption_drop"):
            if not 0 <= getattr(o, name) <= 1:
                raise ValueError(f"task_options.{name} must lie in [0, 1]")
        unet = UNet.from_pretrained(o.model).train() if Path(o.model).is_dir() else UNet(o.model)
        if self.ctx.activation_checkpointing:
            unet.enable_gradient_checkpointing()
        self.vae = load_frozen_vae(o.vae, self.ctx.device)
        width = unet.text_dim
        if o.text_encoder == "tiny":
            self.ctx.out_dir.mkdir(parents=True, exist_ok=True)
            text = build_tiny_text_encoder(self.ctx.out_dir / "text_encoder", width, self.ctx.seed, o.tokenizer_vocab,
                                          o.tokenizer_scenes)
        else:
            from dalle3_fast.models.text_encoder import T5TextEncoder
            try:
                text = T5TextEncoder.from_pretrained(o.text_encoder)
            except CheckpointError as exc:
                raise CheckpointError(f"task_options.text_encoder={o.text_encoder!r} cannot be loaded: {exc}") from exc
        if text.hidden_size != width:
            raise ValueError(f"task_options.text_encoder gives {text.hidden_size}-wide tokens but the U-Net "
                             f"cross-attends to {width}; pick a matching pair")
        if o.train_text_encoder:
            self.text_encoder = None  # it lives in the trained module
            text.requires_grad_(True)
            model = UNetWithTextEncoder(unet, text).train()
        else:
            self.text_encoder = freeze(text.to(self.ctx.device))
            model = unet
        self.schedule = NoiseSchedule(o.beta_schedule, o.num_train_timesteps, o.beta_start, o.beta_end)
        self._micro = unet.size_conditioned
        self._posterior = (None, None)  # (image batch number, its VAE posterior)
        return model

    def batches(self, batch_size, rank, world_size, start):
        o = self.options
        k = o.latent_reuse
        stream = image_batches(o, batch_size, rank, world_size, start // k, multiple=8)
        for i, batch in zip(itertools.count(start // k), stream):
            for m in range(max(start, i * k), (i + 1) * k):
                rng = random.Random(f"{o.data_seed}:captions:{rank}:{m}")
                captions = blend_captions(batch["records"], rng, synthetic_ratio=o.synthetic_ratio,
                                          synthetic_key=o.synthetic_key, original_key=o.original_key,
                                          drop=o.caption_drop)
                yield {**batch, "captions": captions, "image_batch": i}

    def _parts(self, model: nn.Module):
        """(U-Net, text encoder) of the trained module."""
        if isinstance(model, UNetWithTextEncoder):
            return model.unet, model.text_encoder
        return model, self.text_encoder

    def _encode_text(self, text_encoder, captions: list[str]):
        """Token embeddings and lengths; with gradients when the encoder trains (and grad mode is on)."""
        if not self.options.train_text_encoder:
            with torch.no_grad():
                return text_encoder.encode(captions)
        batch = text_encoder.tokenize(captions).to(text_encoder.device)
        return text_encoder(batch.ids, batch.lengths)

    def _net_fn(self, unet: UNet, image_hw: tuple[int, int]):
        def fn(x_t, t, context, lengths):
            extra = {}
            if self._micro:
                b = x_t.shape[0]
                extra["added_cond_kwargs"] = {"text_embeds": pooled_text_embeds(context, lengths),
                                              "time_ids": size_time_ids(b, image_hw, (0, 0), image_hw, x_t.device)}
            return unet(x_t, t, encoder_hidden_states=context, encoder_lengths=lengths, **extra)
        return fn

    def loss(self, model: nn.Module, batch):
        unet, text_encoder = self._parts(model)
        images = batch["image"]
        number, posterior = self._posterior
        if posterior is None or number != batch["image_batch"]:  # encode once per image batch (latent_reuse)
            with torch.no_grad():
                posterior = self.vae.encode(images)
            self._posterior = (batch["image_batch"], posterior)
        latents = self.vae.scale_latents(posterior.sample())
        context, lengths = self._encode_text(text_encoder, batch["captions"])
        o = self.options
        loss = diffusion_loss(self._net_fn(unet, tuple(images.shape[-2:])), self.schedule, latents,
                              prediction_type=o.prediction_type, cond={"context": context, "lengths": lengths},
                              min_snr_gamma=o.min_snr_gamma or None)
        return loss, {}

    @torch.no_grad()
    def sample(self, model: nn.Module, step):
        o = self.options
        model.eval()
        unet, text_encoder = self._parts(model)
        prompts = list(o.sample_prompts)
        if not prompts:
            held_out = next(image_batches(o, o.sample_count, 0, 1, 10_000_000, 8))
            prompts = [r.get(o.synthetic_key) or r.get(o.original_key) for r in held_out["records"]]
        size = (o.buckets[0] if o.buckets else [o.resolution, o.resolution])
        f = self.vae.config.downsample_factor
        shape = (len(prompts), unet.in_channels, size[1] // f, size[0] // f)
        sigmas = sampling_sigmas(self.schedule, o.sample_steps)
        x = initial_noise(shape, sigmas[0], generator=torch.Generator().manual_seed(0), device=self.ctx.device)
        context, lengths = self._encode_text(text_encoder, prompts)
        empty, empty_lengths = self._encode_text(text_encoder, [""] * len(prompts))
        denoiser = Denoiser(self._net_fn(unet, (size[1], size[0])), self.schedule, o.prediction_type)
        model_fn = cfg_model_fn(denoiser, {"context": context, "lengths": lengths},
                                {"context": empty, "lengths": empty_lengths}, o.guidance_scale)
        latents = sample_dpmpp_2m(model_fn, x, sigmas)
        return to_unit(self.vae.decode(self.vae.unscale_latents(latents)))

    def export(self, model: nn.Module, directory: Path):
        unet, text_encoder = self._parts(model)
        if self.options.train_text_encoder:  # first: a directory holding the U-Net is a whole export
            text_encoder.save_pretrained(Path(directory) / TEXT_ENCODER_DIR)
        unet.save_pretrained(directory)
        write_config(self.schedule.to_diffusers_config(self.options.prediction_type), directory, SCHEDULER_CONFIG)
