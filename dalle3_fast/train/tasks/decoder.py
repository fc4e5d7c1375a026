"""Tasks ``decoder`` (the latent decoder as a diffusion model) and ``decoder_distill`` (to 2 steps).

``decoder``: EDM-preconditioned denoising on (image, VAE latent) pairs over the cosine 1024-step
schedule: the network output F must equal ``(x0 - c_skip x) / c_out`` at a uniform timestep
(the lambda-weighted x0 loss of Karras et al., ``EDMDenoiser.loss``), the parameterisation the samplers use.

``decoder_distill``: consistency distillation of a trained decoder (teacher, frozen) into a student
initialised from it, with an EMA target network, per
:func:`dalle3_fast.diffusion.consistency_distillation_loss`; the student then decodes in 2 steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dalle3_fast.diffusion import (consistency_distillation_loss, decode_consistency, decode_ddim, decoder_denoiser,
                                   update_ema)
from dalle3_fast.models.latent_decoder import LatentDecoder, latent_decoder_config

from ..task import Task, register_task
from .frozen import freeze, load_frozen_vae, required_dir
from .image_data import ImageDataOptions, image_batches, to_unit


class _DecoderTaskBase(Task):
    def _latents_condition(self, net: LatentDecoder, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.vae is not None:
                z = self.vae.encode(images.to(next(self.vae.parameters()).dtype)).mode()
            else:
                z = net.encode(images).mode()
            return net.condition(z.float()).to(images.dtype)

    def _setup_vae(self, net: LatentDecoder) -> None:
        self.vae = load_frozen_vae(self.options.vae, self.ctx.device) if self.options.vae else None
        if self.vae is None and net.encoder is None:
            raise ValueError("task_options.vae is required: this latent decoder has no encoder of its own "
                             "(with_encoder false); pass the directory of the trained VAE")
        if net.encoder is not None:  # latents come from a frozen encoder, never trained here
            freeze(net.encoder)
            freeze(net.quant_conv)
        if self.ctx.activation_checkpointing:
            net.decoder_unet.gradient_checkpointing = True
        self._multiple = 8 * net.decoder_unet.size_multiple

    def batches(self, batch_size, rank, world_size, start):
        return image_batches(self.options, batch_size, rank, world_size, start, multiple=self._multiple)

    def _held_out(self) -> torch.Tensor:
        batch = next(image_batches(self.options, self.options.sample_count, 0, 1, 10_000_000, self._multiple))
        return batch["image"].to(self.ctx.device)

    def export(self, model, directory):
        model.save_pretrained(directory)


@register_task("decoder")
class DecoderTask(_DecoderTaskBase):
    @dataclass
    class Options(ImageDataOptions):
        model: str = "tiny"        # a named latent-decoder config (tiny, openai) or a directory to fine-tune
        # fields of the named config to override, e.g. {"latent_channels": 16, "decoder_in_channels": 19, ...}
        model_config: dict = field(default_factory=dict)
        vae: str = ""              # the VAE whose latents are decoded (unless the decoder has its own encoder)
        sample_count: int = 4
        sample_steps: int = 20     # DDIM steps for the sample grid

    def build_model(self) -> nn.Module:
        o = self.options
        if Path(o.model).is_dir():
            if o.model_config:
                raise ValueError(f"task_options.model_config applies to a named config, but model {o.model!r} is a "
                                 "directory whose config.json fixes the architecture; drop model_config")
            net = LatentDecoder.from_pretrained(o.model).train()
        else:
            try:
                net = LatentDecoder(latent_decoder_config(o.model, **o.model_config))
            except TypeError as exc:
                raise ValueError(f"task_options.model_config {o.model_config}: {exc}; use latent decoder config "
                                 "fields (latent_channels, decoder_in_channels, latents_mean, ...)") from exc
        self._setup_vae(net)
        return net

    def loss(self, net: LatentDecoder, batch):
        x0 = batch["image"]
        cond = self._latents_condition(net, x0)
        denoiser = decoder_denoiser(net)
        t = torch.randint(0, net.num_train_timesteps, (x0.shape[0],), device=x0.device)
        sigma = denoiser.schedule.sigmas.to(x0.device)[t]
        return denoiser.loss(x0, torch.randn_like(x0), sigma, cond=cond), {}

    def sample(self, net: LatentDecoder, step):
        net.eval()
        x = self._held_out()
        z = self.vae.encode(x).mode() if self.vae is not None else net.encode(x).mode()
        g = torch.Generator(self.ctx.device).manual_seed(0)
        decoded = decode_ddim(net, z, self.options.sample_steps, generator=g)
        rows = [x, decoded]
        if self.vae is not None:
            rows.insert(1, self.vae.decode(z))
        return to_unit(torch.cat(rows))


@register_task("decoder_distill")
class DecoderDistillTask(_DecoderTaskBase):
    @dataclass
    class Options(ImageDataOptions):
        teacher: str = ""          # directory of the trained decoder (task ``decoder``'s final/)
        vae: str = ""
        skip: int = 20             # k: timesteps the teacher's DDIM step spans (LCM: 1000 / 50)
        huber_c: float = 1e-3
        target_decay: float = 0.95  # EMA of the target network
        sample_count: int = 4
        sample_steps: int = 20     # the teacher's DDIM steps in the sample grid

    def build_model(self) -> nn.Module:
        path = required_dir(self.options.teacher, "teacher", "the trained latent decoder")
        self.teacher = freeze(LatentDecoder.from_pretrained(path, device=self.ctx.device))
        student = LatentDecoder.from_pretrained(path).train()
        self.target = freeze(copy.deepcopy(student).to(self.ctx.device))
        self._setup_vae(student)
        return student

    def loss(self, net: LatentDecoder, batch):
        x0 = batch["image"]
        cond = self._latents_condition(net, x0)
        student = decoder_denoiser(net)
        loss = consistency_distillation_loss(
            student, decoder_denoiser(self.target), decoder_denoiser(self.teacher), x0, student.schedule,
            skip=self.options.skip, huber_c=self.options.huber_c, cond={"cond": cond})
        return loss, {}

    def after_step(self, net, step):
        trained = [p for p in net.parameters() if p.requires_grad]
        target = [p for p, q in zip(self.target.parameters(), net.parameters()) if q.requires_grad]
        update_ema(target, trained, self.options.target_decay)

    def state_dict(self):
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state):
        self.target.load_state_dict({k[len("target."):]: v for k, v in state.items()}, strict=True)

    def sample(self, net: LatentDecoder, step):
        net.eval()
        x = self._held_out()
        z = self.vae.encode(x).mode() if self.vae is not None else net.encode(x).mode()
        two_step = decode_consistency(net, z, generator=torch.Generator(self.ctx.device).manual_seed(0))
        teacher = decode_ddim(self.teacher, z, self.options.sample_steps,
                              generator=torch.Generator(self.ctx.device).manual_seed(0))
        return to_unit(torch.cat([x, teacher, two_step]))
