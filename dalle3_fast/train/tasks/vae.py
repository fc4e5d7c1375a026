"""Task ``vae``: the KL-f8 autoencoder. Loss = reconstruction + kl_weight * KL [+ PatchGAN hinge from gan_start].

Reconstruction is L1 (``recon_loss="l1"``, as for the SD VAE) or MSE + 0.1 L1 (``"mse+l1"``), per pixel,
optionally weighted: ``foreground_weight`` w gives weight 1 + w to the pixels that differ from the image's
per-channel median (its background) by more than 0.05, so small objects on a flat background are not
drowned by it (the loss is normalised by the mean weight). ``logvar_init`` resets the posterior's
log-variance head (zero weights, that bias) before training, e.g. -9 for std 0.01: with the default
init the sampling noise starts near std 1 and hides hue until the KL term has long settled.

The optional discriminator trains in the same optimizer step: its loss sees the reconstruction
detached, and the generator's adversarial term runs the discriminator with detached weights, so
each loss reaches only its own network's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dalle3_fast.models.vae import AutoencoderKL, estimate_scaling_factor, vae_config, widen_latent_channels

from ..task import Task, register_task
from .image_data import ImageDataOptions, image_batches, to_unit


RECON_LOSSES = ("l1", "mse+l1")
BACKGROUND_TOLERANCE = 0.05  # in [-1, 1] units: anti-aliased edges count as foreground


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on the background (each image's per-channel median), 1 + weight elsewhere."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = (x - background).abs().amax(dim=1, keepdim=True) > BACKGROUND_TOLERANCE
    return 1 + weight * foreground.to(x.dtype)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, kind: str = "l1", foreground_weight: float = 0.0):
    err = recon - x
    per_pixel = err.abs() if kind == "l1" else err.square() + 0.1 * err.abs()
    if not foreground_weight:
        return per_pixel.mean()
    w = foreground_weights(x, foreground_weight)
    return (w * per_pixel).mean() / w.mean()


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (as taming-transformers uses for the SD VAE): one logit per image patch."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            mods += [nn.Conv2d(ch, out, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                     nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VAEWithDiscriminator(nn.Module):
    def __init__(self, vae: AutoencoderKL, disc: PatchDiscriminator | None):
        super().__init__()
        self.vae, self.disc = vae, disc


@register_task("vae")
class VAETask(Task):
    @dataclass
    class Options(ImageDataOptions):
        model: str = "tiny"                 # a named VAE config (tiny, sd, sdxl) or a model directory to fine-tune
        # fields of the named config to override, e.g. {"latent_channels": 16, "block_out_channels": [32, 64, 64, 64]};
        # with a model directory only latent_channels, which widens its latents (widen_latent_channels)
        model_config: dict = field(default_factory=dict)
        kl_weight: float = 1e-6
        sample_posterior: bool = True
        recon_loss: str = "l1"              # "l1" or "mse+l1"
        foreground_weight: float = 0.0
        logvar_init: float | None = None
        gan_start: int = 0                  # optimizer step the PatchGAN starts at; 0 = no discriminator
        gan_weight: float = 0.5
        disc_width: int = 64
        estimate_scaling_factor: bool = True  # at export: scaling_factor = 1 / std of latents
        sample_count: int = 8

    def build_model(self) -> nn.Module:
        o = self.options
        if o.recon_loss not in RECON_LOSSES:
            raise ValueError(f"task_options.recon_loss must be one of {', '.join(RECON_LOSSES)}, got {o.recon_loss!r}")
        if o.foreground_weight < 0:
            raise ValueError(f"task_options.foreground_weight must be >= 0, got {o.foreground_weight}")
        if Path(o.model).is_dir():
            if set(o.model_config) - {"latent_channels"}:
                raise ValueError(f"task_options.model_config: model {o.model!r} is a directory whose config.json fixes "
                                 "the architecture; only latent_channels (to widen its latents) may be given")
            vae = AutoencoderKL.from_pretrained(o.model).train()
            if "latent_channels" in o.model_config:
                vae = widen_latent_channels(vae, o.model_config["latent_channels"])
        else:
            try:
                vae = AutoencoderKL(vae_config(o.model, **o.model_config))
            except TypeError as exc:
                raise ValueError(f"task_options.model_config {o.model_config}: {exc}; use AutoencoderKL config "
                                 "fields (latent_channels, block_out_channels, layers_per_block, ...)") from exc
        if o.logvar_init is not None:
            with torch.no_grad():
                logvar = slice(vae.config.latent_channels, None)
                vae.quant_conv.weight[logvar] = 0
                vae.quant_conv.bias[logvar] = o.logvar_init
        if self.ctx.activation_checkpointing:
            vae.enable_gradient_checkpointing()
        self.step = torch.zeros((), dtype=torch.int64)
        disc = PatchDiscriminator(vae.config.out_channels, o.disc_width) if o.gan_start > 0 else None
        self._factor = vae.config.downsample_factor
        return VAEWithDiscriminator(vae, disc)

    def batches(self, batch_size, rank, world_size, start):
        return image_batches(self.options, batch_size, rank, world_size, start, multiple=self._factor)

    def loss(self, model: VAEWithDiscriminator, batch):
        x = batch["image"]
        posterior = model.vae.encode(x)
        z = posterior.sample() if self.options.sample_posterior else posterior.mode()
        recon = model.vae.decode(z)
        rec = reconstruction_loss(recon.float(), x.float(), self.options.recon_loss, self.options.foreground_weight)
        kl = posterior.kl().float().mean() / x[0].numel()  # per pixel, like the L1 term
        loss = rec + self.options.kl_weight * kl * x[0].numel()
        metrics = {"rec": rec.detach(), "kl": (kl * x[0].numel()).detach()}
        if model.disc is not None:
            on = float(int(self.step) >= self.options.gan_start)
            frozen = {k: v.detach() for k, v in model.disc.named_parameters()}
            g_loss = -functional_call(model.disc, frozen, (recon,)).float().mean()
            real, fake = model.disc(x).float(), model.disc(recon.detach()).float()
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            loss = loss + on * (self.options.gan_weight * g_loss + d_loss)
            metrics.update(g_loss=g_loss.detach(), d_loss=d_loss.detach())
        return loss, metrics

    def after_step(self, model, step):
        self.step = torch.tensor(step, dtype=torch.int64)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

    def sample(self, model, step):
        batch = next(image_batches(self.options, self.options.sample_count, 0, 1, 10_000_000, self._factor))
        x = batch["image"].to(self.ctx.device)
        model.eval()
        recon = model.vae.decode(model.vae.encode(x).mode())
        return to_unit(torch.cat([x, recon.float()]))

    def export(self, model, directory):
        vae = model.vae
        if self.options.estimate_scaling_factor:
            batch = next(image_batches(self.options, 16, 0, 1, 20_000_000, self._factor))
            z = vae.encode(batch["image"].to(self.ctx.device)).mode()
            vae.config.scaling_factor = estimate_scaling_factor(z)
        vae.save_pretrained(directory)
