"""DALL-E 3's latent decoder network: a pixel-space diffusion U-Net on VAE latents.

The layout is OpenAI's released consistency decoder as diffusers' ``ConsistencyDecoderVAE``
holds it, so those directories load:

    encoder, quant_conv   the SD KL-f8 encoder (models/vae.py), optional here
    decoder_unet          UNet2DModel: conv_in(3 noisy RGB + 4 upsampled latents) -> ResnetDownsampleBlock2D
                          levels -> mid (2 ResBlocks) -> ResnetUpsampleBlock2D levels -> GN+SiLU -> conv_out (6)
                          time: learned nn.Embedding over the train timesteps -> MLP -> scale-shift ResBlocks

The model is the network only (``condition`` then ``forward`` = EDM's F); the schedule (cosine, 1024
timesteps), the EDM preconditioning with ``sigma_data`` and the samplers are the shared ones in
``dalle3_fast.diffusion``: ``latent_decoding.decode_consistency`` (2 steps, equal to diffusers'
ConsistencyDecoderVAE.decode for the same noise) and ``decode_ddim`` (the undistilled teacher).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import io, ops
from dalle3_fast.models.vae import DiagonalGaussian, Encoder
from dalle3_fast.models.weights import weights_file_name
from dalle3_fast.nn.checkpointing import checkpointed
from dalle3_fast.nn.embeddings import TimestepEmbedding
from dalle3_fast.nn.resnet import ResnetBlock2D

# The latent statistics OpenAI's decoder normalises with (diffusers hard-codes them).
OPENAI_LATENTS_MEAN = (0.38862467, 0.02253063, 0.07381133, -0.0171294)
OPENAI_LATENTS_STD = (0.9654121, 1.0440036, 0.76147926, 0.77022034)
SCHEDULER_CONFIG = "scheduler_config.json"


# --------------------------------------------------------------------------- U-Net

def _resnet(in_ch, out_ch, temb_ch, groups, eps, scale_shift, **kw) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb_ch, groups=groups, eps=eps,
                         time_embedding_norm="scale_shift" if scale_shift else "default", **kw)


class ResnetDownsampleBlock(nn.Module):
    """diffusers' ResnetDownsampleBlock2D: ResBlocks, then a ResBlock with 2x2 average pooling."""

    def __init__(self, in_ch, out_ch, temb_ch, num_layers, groups, eps, scale_shift, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps, scale_shift)
                                      for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([_resnet(out_ch, out_ch, temb_ch, groups, eps, scale_shift, down=True)])
                             if add_downsample else None)

    def forward(self, x, temb, use_checkpoint=False):
        skips = []
        for resnet in self.resnets:
            x = checkpointed(resnet, use_checkpoint, x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = checkpointed(self.downsamplers[0], use_checkpoint, x, temb)
            skips.append(x)
        return x, skips


class ResnetUpsampleBlock(nn.Module):
    """diffusers' ResnetUpsampleBlock2D: ResBlocks on [x, skip] concatenations, then a ResBlock with nearest 2x."""

    def __init__(self, in_ch, prev_out_ch, out_ch, temb_ch, num_layers, groups, eps, scale_shift, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            skip_ch = in_ch if i == num_layers - 1 else out_ch
            res_in = prev_out_ch if i == 0 else out_ch
            self.resnets.append(_resnet(res_in + skip_ch, out_ch, temb_ch, groups, eps, scale_shift))
        self.upsamplers = (nn.ModuleList([_resnet(out_ch, out_ch, temb_ch, groups, eps, scale_shift, up=True)])
                           if add_upsample else None)

    def forward(self, x, skips, temb, use_checkpoint=False):
        for resnet in self.resnets:
            x = torch.cat([x, skips.pop()], dim=1)
            x = checkpointed(resnet, use_checkpoint, x, temb)
        if self.upsamplers is not None:
            x = checkpointed(self.upsamplers[0], use_checkpoint, x, temb)
        return x


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D with add_attention=False: two time-conditioned ResBlocks."""

    def __init__(self, ch, temb_ch, groups, eps, scale_shift):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(ch, ch, temb_ch, groups, eps, scale_shift) for _ in range(2)])

    def forward(self, x, temb, use_checkpoint=False):
        for resnet in self.resnets:
            x = checkpointed(resnet, use_checkpoint, x, temb)
        return x


class ConsistencyDecoderUNet(nn.Module):
    """The decoder U-Net (diffusers' UNet2DModel subset the consistency decoder uses)."""

    def __init__(self, in_channels=7, out_channels=6, block_out_channels=(320, 640, 1024, 1024), layers_per_block=3,
                 norm_num_groups=32, norm_eps=1e-5, num_train_timesteps=1024, resnet_time_scale_shift="scale_shift"):
        super().__init__()
        if resnet_time_scale_shift not in ("scale_shift", "default"):
            raise ValueError(f"ConsistencyDecoderUNet: resnet_time_scale_shift={resnet_time_scale_shift!r} is not "
                             "supported; use 'scale_shift' (or 'default')")
        self.block_out_channels = tuple(block_out_channels)
        self.num_train_timesteps = num_train_timesteps
        self.gradient_checkpointing = False
        scale_shift = resnet_time_scale_shift == "scale_shift"
        ch0 = block_out_channels[0]
        temb_ch = 4 * ch0
        self.conv_in = nn.Conv2d(in_channels, ch0, kernel_size=3, padding=1)
        self.time_proj = nn.Embedding(num_train_timesteps, ch0)
        self.time_embedding = TimestepEmbedding(ch0, temb_ch)
        n = len(block_out_channels)
        self.down_blocks = nn.ModuleList()
        out_ch = ch0
        for i, ch in enumerate(block_out_channels):
            in_ch, out_ch = out_ch, ch
            self.down_blocks.append(ResnetDownsampleBlock(in_ch, out_ch, temb_ch, layers_per_block, norm_num_groups,
                                                          norm_eps, scale_shift, add_downsample=i < n - 1))
        self.mid_block = MidBlock(block_out_channels[-1], temb_ch, norm_num_groups, norm_eps, scale_shift)
        rev = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        out_ch = rev[0]
        for i in range(n):
            prev_out, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            self.up_blocks.append(ResnetUpsampleBlock(in_ch, prev_out, out_ch, temb_ch, layers_per_block + 1,
                                                      norm_num_groups, norm_eps, scale_shift, add_upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(num_channels=ch0, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_out = nn.Conv2d(ch0, out_channels, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """sample (B, in_channels, H, W), timestep int / (B,) long -> (B, out_channels, H, W)."""
        B, _, H, W = sample.shape
        m = self.size_multiple
        if H % m or W % m:
            raise ValueError(f"ConsistencyDecoderUNet: image size {(H, W)} must be a multiple of {m}")
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(B)
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        ckpt = self.gradient_checkpointing
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, ckpt)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, ckpt)
        for block in self.up_blocks:
            x = block(x, skips, temb, ckpt)
        x = ops.group_norm_silu(x, self.conv_norm_out.weight, self.conv_norm_out.bias,
                                self.conv_norm_out.num_groups, self.conv_norm_out.eps)
        return self.conv_out(x)


# --------------------------------------------------------------------------- config

_DOWN, _UP, _ENC = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D", "DownEncoderBlock2D"
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "force_upcast",
                 "block_out_channels", "decoder_downsample_padding"}


@dataclass
class LatentDecoderConfig:
    """diffusers' ConsistencyDecoderVAE config, plus our fields (latents_mean/std, sigma_data, with_encoder)."""

    scaling_factor: float = 0.18215
    latent_channels: int = 4
    sample_size: int = 32
    latents_mean: tuple[float, ...] = OPENAI_LATENTS_MEAN
    latents_std: tuple[float, ...] = OPENAI_LATENTS_STD
    sigma_data: float = 0.5
    with_encoder: bool = True
    encoder_in_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    encoder_layers_per_block: int = 2
    encoder_norm_num_groups: int = 32
    decoder_in_channels: int = 7
    decoder_out_channels: int = 6
    decoder_block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024)
    decoder_layers_per_block: int = 3
    decoder_norm_num_groups: int = 32
    decoder_norm_eps: float = 1e-5
    decoder_num_train_timesteps: int = 1024
    decoder_resnet_time_scale_shift: str = "scale_shift"

    def __post_init__(self):
        self.encoder_block_out_channels = tuple(int(c) for c in self.encoder_block_out_channels)
        self.decoder_block_out_channels = tuple(int(c) for c in self.decoder_block_out_channels)
        self.latents_mean = tuple(float(v) for v in self.latents_mean)
        self.latents_std = tuple(float(v) for v in self.latents_std)
        problems = []
        if self.decoder_in_channels != 3 + self.latent_channels:
            problems.append(f"decoder_in_channels={self.decoder_in_channels} must be 3 + latent_channels "
                            f"({3 + self.latent_channels})")
        if self.decoder_out_channels < 3:
            problems.append(f"decoder_out_channels={self.decoder_out_channels} must be >= 3 (RGB first)")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.latent_channels:
                problems.append(f"{name} has {len(getattr(self, name))} entries, latent_channels is "
                                f"{self.latent_channels}")
        for name, groups in (("decoder", self.decoder_norm_num_groups), ("encoder", self.encoder_norm_num_groups)):
            if name == "encoder" and not self.with_encoder:
                continue
            for c in getattr(self, f"{name}_block_out_channels"):
                if c % groups:
                    problems.append(f"{name}_norm_num_groups={groups} does not divide {name} channels {c}")
        if problems:
            raise ValueError("LatentDecoderConfig: " + "; ".join(problems))

    @property
    def latent_upsample_factor(self) -> int:
        """Image pixels per latent along each side (8 for KL-f8), from the encoder's level count as in diffusers."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> "LatentDecoderConfig":
        """Read a ConsistencyDecoderVAE config.json dict; anything outside the supported subset is refused."""
        config = dict(config)
        cls_name = config.get("_class_name", "ConsistencyDecoderVAE")
        if cls_name != "ConsistencyDecoderVAE":
            raise ValueError(f"latent decoder config: _class_name={cls_name!r} is not supported; "
                             "expected 'ConsistencyDecoderVAE'")
        n_dec = len(config.get("decoder_block_out_channels", cls.decoder_block_out_channels))
        n_enc = len(config.get("encoder_block_out_channels", cls.encoder_block_out_channels))
        fixed = {
            "decoder_add_attention": (False, None),
            "decoder_time_embedding_type": ("learned", None),
            "decoder_down_block_types": ([_DOWN] * n_dec, list),
            "decoder_up_block_types": ([_UP] * n_dec, list),
            "encoder_act_fn": ("silu", None),
            "encoder_double_z": (True, None),
            "encoder_down_block_types": ([_ENC] * n_enc, list),
            "encoder_out_channels": (config.get("latent_channels", cls.latent_channels), None),
        }
        problems = []
        for key, (want, conv) in fixed.items():
            if key in config:
                got = config.pop(key)
                if (conv(got) if conv else got) != want:
                    problems.append(f"{key}={got!r} (supported: {want!r})")
        if "block_out_channels" in config and list(config["block_out_channels"]) != list(
                config.get("encoder_block_out_channels", cls.encoder_block_out_channels)):
            problems.append("block_out_channels differs from encoder_block_out_channels")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names - _IGNORED_KEYS)
        if unknown:
            problems.append("unknown fields " + ", ".join(unknown))
        if problems:
            raise ValueError("latent decoder config is outside the supported ConsistencyDecoderVAE subset: "
                             + "; ".join(problems))
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        """config.json contents that diffusers' ConsistencyDecoderVAE also reads (it ignores our extra fields)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        n_dec, n_enc = len(self.decoder_block_out_channels), len(self.encoder_block_out_channels)
        d.update(_class_name="ConsistencyDecoderVAE", block_out_channels=list(self.encoder_block_out_channels),
                 decoder_add_attention=False, decoder_time_embedding_type="learned", decoder_downsample_padding=1,
                 decoder_down_block_types=[_DOWN] * n_dec, decoder_up_block_types=[_UP] * n_dec,
                 encoder_act_fn="silu", encoder_double_z=True, encoder_down_block_types=[_ENC] * n_enc,
                 encoder_out_channels=self.latent_channels, force_upcast=False)
        return d


NAMED_CONFIGS = {
    # The embedded 64x64 pipeline's decoder: pairs with vae_config("tiny") (KL-f8, 4 latent channels).
    "tiny": dict(with_encoder=False, encoder_block_out_channels=(32, 64, 64, 64), encoder_norm_num_groups=16,
                 encoder_layers_per_block=1, decoder_block_out_channels=(32, 64, 64), decoder_layers_per_block=1,
                 decoder_norm_num_groups=16, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4, sample_size=8),
    # OpenAI's released consistency decoder (the diffusers defaults).
    "openai": dict(),
}


def latent_decoder_config(name: str, **overrides) -> LatentDecoderConfig:
    """A named config ("tiny", "openai"), optionally with fields overridden."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown latent decoder config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return LatentDecoderConfig(**{**NAMED_CONFIGS[name], **overrides})


# --------------------------------------------------------------------------- model

class LatentDecoder(nn.Module):
    """Latents -> images by a few steps of a pixel-space diffusion decoder (ConsistencyDecoderVAE layout)."""

    def __init__(self, config: LatentDecoderConfig | dict | str | None = None, **overrides):
        super().__init__()
        if config is None:
            config = LatentDecoderConfig(**overrides)
        elif isinstance(config, str):
            config = latent_decoder_config(config, **overrides)
        elif isinstance(config, dict):
            config = LatentDecoderConfig.from_dict({**config, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = c = config
        if c.with_encoder:
            self.encoder = Encoder(c.encoder_in_channels, c.latent_channels, c.encoder_block_out_channels,
                                   c.encoder_layers_per_block, c.encoder_norm_num_groups, double_z=True)
            self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        else:
            self.encoder = self.quant_conv = None
        self.decoder_unet = ConsistencyDecoderUNet(
            c.decoder_in_channels, c.decoder_out_channels, c.decoder_block_out_channels, c.decoder_layers_per_block,
            c.decoder_norm_num_groups, c.decoder_norm_eps, c.decoder_num_train_timesteps,
            c.decoder_resnet_time_scale_shift)
        self.register_buffer("means", torch.tensor(c.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("stds", torch.tensor(c.latents_std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.decoder_num_train_timesteps

    @property
    def sigma_data(self) -> float:
        return self.config.sigma_data

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] -> posterior over (unscaled) latents; needs a config with ``with_encoder``."""
        if self.encoder is None:
            raise ValueError("LatentDecoder.encode: this decoder was built without an encoder "
                             "(with_encoder=False); encode with the VAE instead")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latents (B, C, h, w) -> the U-Net's conditioning (B, C, h*f, w*f): scaled, normalised, upsampled."""
        c = self.config
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != c.latent_channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"LatentDecoder: latents must be (B, {c.latent_channels}, h, w), got {shape}")
        z = (z * c.scaling_factor - self.means.to(z.dtype)) / self.stds.to(z.dtype)
        return F.interpolate(z, mode="nearest", scale_factor=c.latent_upsample_factor)

    def timesteps(self, t, batch: int, device) -> torch.Tensor:
        """t (int, float or (B,) tensor) -> (B,) long, rounded to the nearest of the learned timestep embeddings.

        Ints and CPU tensors are range-checked.
        """
        T = self.num_train_timesteps
        if isinstance(t, (int, float)):  # checked in Python, so a traced graph holds no data-dependent branch
            if not 0 <= round(t) < T:
                raise ValueError(f"timestep {t} is outside [0, {T})")
            return torch.as_tensor(round(t), device=device).expand(batch)
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point():
            t = t.round()
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}; pass one or one per sample")
        if t.device.type == "cpu" and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"timestep {t.tolist()} is outside [0, {T})")
        return t

    def forward(self, sample: torch.Tensor, timestep, cond: torch.Tensor) -> torch.Tensor:
        """The EDM network F: sample (B, 3, H, W), already scaled by c_in; cond from :meth:`condition` -> (B, 3, H, W).

        Samplers reach it through ``diffusion.latent_decoding`` (an ``EDMDenoiser`` on the cosine 1024-step schedule).
        """
        if sample.shape[0] != cond.shape[0] or sample.shape[-2:] != cond.shape[-2:] or sample.shape[1] != 3:
            raise ValueError(f"LatentDecoder: x_t {tuple(sample.shape)} must be (B, 3, H, W) matching the "
                             f"conditioning {tuple(cond.shape)}")
        t = self.timesteps(timestep, sample.shape[0], sample.device)
        return self.decoder_unet(torch.cat([sample, cond.to(sample.dtype)], dim=1), t)[:, :3]

    # ---------------------------------------------------------------- I/O

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + diffusion_pytorch_model.safetensors (+ scheduler_config.json), diffusers' layout."""
        io.save_pretrained(self, self.config.to_dict(), directory)
        io.write_config({"_class_name": "ConsistencyDecoderScheduler",
                         "num_train_timesteps": self.config.decoder_num_train_timesteps,
                         "sigma_data": self.config.sigma_data}, directory, name=SCHEDULER_CONFIG)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, variant: str | None = None) -> "LatentDecoder":
        """Load a diffusers ConsistencyDecoderVAE directory or one written by ``save_pretrained``, strictly.

        A directory without encoder weights (``with_encoder`` false in its config) loads the decoder alone.
        ``sigma_data`` comes from ``scheduler_config.json`` when the directory has one. ``variant="fp16"``
        reads ``diffusion_pytorch_model.fp16.safetensors`` (the released decoder ships one).
        """
        directory = Path(directory)
        raw = io.read_config(directory)
        if (directory / SCHEDULER_CONFIG).is_file():
            sched = io.read_config(directory, SCHEDULER_CONFIG)
            raw.setdefault("sigma_data", sched.get("sigma_data", 0.5))
            T = sched.get("num_train_timesteps", raw.get("decoder_num_train_timesteps", 1024))
            if T != raw.get("decoder_num_train_timesteps", 1024):
                raise ValueError(f"{directory}: scheduler num_train_timesteps={T} differs from the U-Net's "
                                 f"decoder_num_train_timesteps={raw.get('decoder_num_train_timesteps', 1024)}")
        model = cls(LatentDecoderConfig.from_dict(raw))
        io.load_weights_into(model, directory, weights_file_name(variant))
        return model.to(device=device, dtype=dtype).eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
