"""KL-f8 VAE in Stable Diffusion's AutoencoderKL layout (diffusers' parameter names).

    vae = AutoencoderKL.from_pretrained("path/to/sd/vae")    # a diffusers AutoencoderKL directory
    posterior = vae.encode(images)                            # images in [-1, 1], (B, 3, H, W)
    latents = vae.scale_latents(posterior.sample(generator))  # what the diffusion model sees
    images = vae.decode(vae.unscale_latents(latents))

Every GroupNorm(+SiLU) is one call to ``dalle3_fast.ops.group_norm_silu``. The mid-block
attention is single-head with head dim = channels (512 in SD); it runs on
``dalle3_fast.ops.attention`` when that head dim is supported by the fused kernels and
on ``torch.nn.functional.scaled_dot_product_attention`` otherwise (SD's 512 included).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle3_fast import io, ops
from dalle3_fast.models.weights import weights_file_name
from dalle3_fast.nn.channels_last import activation_layout, contiguous_state, use_channels_last
from dalle3_fast.nn.checkpointing import checkpointed
from dalle3_fast.nn.resnet import ResnetBlock2D
from dalle3_fast.nn.sampling import Downsample2D, Upsample2D
from dalle3_fast.ops import SUPPORTED_HEAD_DIMS

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code this GroupNorm epsilon


# --------------------------------------------------------------------------- layers

class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual, diffusers' ``Attention`` as the VAE uses it.

    x + to_out(softmax(q k^T / sqrt(C)) v) with q, k, v = to_q/k/v(GroupNorm(x)) over the H*W positions.
    """

    def __init__(self, channels: int, norm_num_groups: int, eps: float = VAE_EPS):
        super().__init__()
        self.channels = channels
        self.group_norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    @property
    def uses_fused_attention(self) -> bool:
        return self.channels in SUPPORTED_HEAD_DIMS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = ops.group_norm_silu(x, self.group_norm.weight, self.group_norm.bias, self.group_norm.num_groups,
                                self.group_norm.eps, silu=False)
        h = h.reshape(B, C, H * W).transpose(1, 2)  # (B, N, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        if self.uses_fused_attention:
            out = ops.attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)).squeeze(2)
        else:
            # Head dim C is outside the fused kernels' set (e.g. 512 in SD): torch's SDPA.
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """ResBlock, [attention, ResBlock] — diffusers' UNetMidBlock2D without time conditioning."""

    def __init__(self, channels: int, norm_num_groups: int, add_attention: bool, dropout: float = 0.0):
        super().__init__()
        self.add_attention = add_attention
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=None, eps=VAE_EPS,
                          groups=norm_num_groups, dropout=dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, norm_num_groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    """ResBlocks, then a stride-2 conv with the bottom/right zero padding (diffusers' DownEncoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int,
                 add_downsample: bool, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, eps=VAE_EPS, groups=norm_num_groups, dropout=dropout)
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=0)])
                             if add_downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """ResBlocks, then nearest 2x + 3x3 conv (diffusers' UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int,
                 add_upsample: bool, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, eps=VAE_EPS, groups=norm_num_groups, dropout=dropout)
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2*latent_channels or latent_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32, double_z: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            in_ch, out_ch = out_ch, ch
            self.down_blocks.append(DownEncoderBlock(in_ch, out_ch, layers_per_block, norm_num_groups,
                                                     add_downsample=i < len(block_out_channels) - 1))
        self.mid_block = MidBlock(block_out_channels[-1], norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[-1], num_groups=norm_num_groups, eps=VAE_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = checkpointed(block, self.gradient_checkpointing, x)
        x = checkpointed(self.mid_block, self.gradient_checkpointing, x)
        x = ops.group_norm_silu(x, self.conv_norm_out.weight, self.conv_norm_out.bias,
                                self.conv_norm_out.num_groups, self.conv_norm_out.eps)
        return self.conv_out(x)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3, block_out_channels=(128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32, mid_block_add_attention: bool = True):
        super().__init__()
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = MidBlock(block_out_channels[-1], norm_num_groups, mid_block_add_attention)
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        out_ch = reversed_channels[0]
        for i, ch in enumerate(reversed_channels):
            in_ch, out_ch = out_ch, ch
            self.up_blocks.append(UpDecoderBlock(in_ch, out_ch, layers_per_block + 1, norm_num_groups,
                                                 add_upsample=i < len(block_out_channels) - 1))
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=VAE_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = checkpointed(self.mid_block, self.gradient_checkpointing, x)
        for block in self.up_blocks:
            x = checkpointed(block, self.gradient_checkpointing, x)
        x = ops.group_norm_silu(x, self.conv_norm_out.weight, self.conv_norm_out.bias,
                                self.conv_norm_out.num_groups, self.conv_norm_out.eps)
        return self.conv_out(x)


# --------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element; logvar clamped to [-30, 20]."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn from ``generator`` (on its device) unless given."""
        if noise is None:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"DiagonalGaussian.sample: `noise` has shape {tuple(noise.shape)}, "
                             f"expected {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W), per sample; ``other`` defaults to N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=[1, 2, 3])


# --------------------------------------------------------------------------- config

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers bookkeeping keys that carry no architecture.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# Pipeline-level statistics: no effect on the network, kept so a saved config round-trips.
_PASSTHROUGH_KEYS = {"latents_mean", "latents_std"}


@dataclass
class AutoencoderKLConfig:
    """The supported subset of diffusers' AutoencoderKL config.

    Defaults are diffusers' (its ``AutoencoderKL.__init__``), so a config.json that leaves a field out
    builds the network diffusers builds from it; Stable Diffusion's VAE is ``vae_config("sd")``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 32
    force_upcast: bool = True
    extra: dict = field(default_factory=dict, repr=False)  # ignored diffusers keys, written back on save

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("AutoencoderKLConfig: block_out_channels must name at least one level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups != 0:
                raise ValueError(f"AutoencoderKLConfig: norm_num_groups={self.norm_num_groups} does not divide "
                                 f"block_out_channels entry {c}; pick a common divisor")
        if self.layers_per_block < 1:
            raise ValueError(f"AutoencoderKLConfig: layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> "AutoencoderKLConfig":
        """Read a diffusers AutoencoderKL config.json dict; fields outside the supported subset are refused."""
        config = dict(config)
        cls_name = config.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name={cls_name!r} is not supported; expected 'AutoencoderKL'")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        problems = []
        down = config.pop("down_block_types", [DOWN_BLOCK] * n)
        up = config.pop("up_block_types", [UP_BLOCK] * n)
        if list(down) != [DOWN_BLOCK] * n:
            problems.append(f"down_block_types={list(down)} (only {DOWN_BLOCK}, one per block_out_channels entry)")
        if list(up) != [UP_BLOCK] * n:
            problems.append(f"up_block_types={list(up)} (only {UP_BLOCK}, one per block_out_channels entry)")
        act = config.pop("act_fn", "silu")
        if act not in ("silu", "swish"):
            problems.append(f"act_fn={act!r} (only 'silu')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(config) - names - _IGNORED_KEYS - _PASSTHROUGH_KEYS)
        if unknown:
            problems.append("unknown fields " + ", ".join(unknown))
        if problems:
            raise ValueError("VAE config is outside the supported AutoencoderKL subset: " + "; ".join(problems))
        extra = {k: config[k] for k in _PASSTHROUGH_KEYS if k in config}
        return cls(**{k: v for k, v in config.items() if k in names}, extra=extra)

    def to_dict(self) -> dict:
        """A diffusers-loadable AutoencoderKL config.json dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["block_out_channels"] = list(self.block_out_channels)
        n = len(self.block_out_channels)
        d.update(_class_name="AutoencoderKL", act_fn="silu", down_block_types=[DOWN_BLOCK] * n,
                 up_block_types=[UP_BLOCK] * n)
        return {**self.extra, **d}


NAMED_CONFIGS = {
    # The embedded 64x64 pipeline's VAE: 8x8x4 latents, ~1.4 M parameters, trains on a 2-core CPU.
    "tiny": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64),
    # Stable Diffusion 1.x / 2.x KL-f8.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               scaling_factor=0.18215, sample_size=512),
    # SDXL: same architecture, its own latent scale.
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 scaling_factor=0.13025, sample_size=1024),
}


def vae_config(name: str, **overrides) -> AutoencoderKLConfig:
    """A named config ("tiny", "sd", "sdxl"), optionally with fields overridden."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return AutoencoderKLConfig(**{**NAMED_CONFIGS[name], **overrides})


# --------------------------------------------------------------------------- model

def rename_legacy_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE checkpoints name the mid attention query/key/value/proj_attn; map them to to_q/.../to_out.0."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if len(parts) >= 3 and ".attentions." in name and parts[-2] in renames:
            name = ".".join(parts[:-2] + [renames[parts[-2]], parts[-1]])
        out[name] = tensor
    return out


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode`` -> DiagonalGaussian, ``decode`` latents -> image."""

    def __init__(self, config: AutoencoderKLConfig | dict | str | None = None, **overrides):
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig(**overrides)
        elif isinstance(config, str):
            config = vae_config(config, **overrides)
        elif isinstance(config, dict):
            config = AutoencoderKLConfig.from_dict({**config, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.block_out_channels, c.layers_per_block,
                               c.norm_num_groups, double_z=True, mid_block_add_attention=c.mid_block_add_attention)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.block_out_channels, c.layers_per_block,
                               c.norm_num_groups, mid_block_add_attention=c.mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.register_state_dict_post_hook(contiguous_state)
        self.use_channels_last()

    def use_channels_last(self, enabled: bool = True) -> "AutoencoderKL":
        """Run the feature maps channels_last (the default; see ``dalle3_fast.nn.channels_last``).

        Inputs and outputs of ``encode``/``decode`` stay in the caller's layout; decoding the tiny
        pipeline's 16 latents of 8x8 on one CPU thread went from 452 to 341 ms."""
        return use_channels_last(self, enabled)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def _check_input(self, name: str, t: torch.Tensor, channels: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != channels:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"AutoencoderKL: `{name}` must be (B, {channels}, H, W), got {shape}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W), H and W multiples of the downsample factor -> posterior over latents."""
        self._check_input("x", x, self.config.in_channels)
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"AutoencoderKL.encode: image size {tuple(x.shape[-2:])} is not a multiple of {f}; "
                             "crop or pad the images")
        h = self.encoder(activation_layout(self.encoder.conv_in, x))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h.contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        self._check_input("z", z, self.config.latent_channels)
        z = activation_layout(self.decoder.conv_in, z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's latents: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``scale_latents``: what ``decode`` takes."""
        return latents / self.scaling_factor + self.shift_factor

    # ---------------------------------------------------------------- I/O

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers-loadable)."""
        io.save_pretrained(self, self.config.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, variant: str | None = None) -> "AutoencoderKL":
        """Load a diffusers AutoencoderKL directory (or one written by ``save_pretrained``), strictly.

        ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors`` instead.
        """
        try:
            model = cls(AutoencoderKLConfig.from_dict(io.read_config(directory)))
        except io.CheckpointError:
            raise
        except (ValueError, TypeError) as exc:
            raise io.CheckpointError(f"{str(Path(directory) / io.CONFIG)!r}: {exc}") from exc
        path = Path(directory) / weights_file_name(variant)
        state = rename_legacy_attention_keys(io.load_safetensors(path))
        io.load_state_dict_strict(model, state, source=f"weights in {str(path)!r}")
        return model.to(device=device, dtype=dtype).eval()


def estimate_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of a batch of VAE latents (SD's recipe for ``scaling_factor`` of a freshly trained VAE)."""
    return float(1.0 / latents.float().std())


@torch.no_grad()
def widen_latent_channels(vae: AutoencoderKL, latent_channels: int) -> AutoencoderKL:
    """A copy of ``vae`` with more latent channels that reconstructs exactly as it does (posterior mode).

    The old channels keep their weights. The new ones: the encoder's output rows keep their fresh
    initialisation (so they carry something from the start), quant_conv / post_quant_conv pass them
    through unchanged, and the decoder's input weights for them start at zero, so the decoder learns to
    read them by fine-tuning; new log-variance rows take the old ones' mean bias.
    """
    c, new = vae.config.latent_channels, int(latent_channels)
    if new < c:
        raise ValueError(f"widen_latent_channels: the VAE has {c} latent channels; {new} would narrow it")
    if not (vae.config.use_quant_conv and vae.config.use_post_quant_conv):
        raise ValueError("widen_latent_channels needs quant_conv and post_quant_conv (use_quant_conv, "
                         "use_post_quant_conv true)")
    with torch.random.fork_rng(devices=[]):  # the new rows' init is seeded; the caller's RNG state is left alone
        torch.manual_seed(0)
        out = AutoencoderKL(dataclasses.replace(vae.config, latent_channels=new)).to(next(vae.parameters()).dtype)
    src, dst = vae.state_dict(), out.state_dict()
    moments = torch.cat([torch.arange(c), new + torch.arange(c)])  # old (mean, logvar) rows in the new layout
    for name, tensor in src.items():
        if name.startswith("encoder.conv_out."):
            dst[name][moments] = tensor
        elif name == "quant_conv.weight":
            w = torch.zeros_like(dst[name])
            w[moments[:, None], moments[None, :]] = tensor
            w[c:new, c:new, 0, 0] = torch.eye(new - c)
            dst[name] = w
        elif name == "quant_conv.bias":
            b = torch.zeros_like(dst[name])
            b[moments] = tensor
            b[new + c:] = tensor[c:].mean()
            dst[name] = b
        elif name == "post_quant_conv.weight":
            w = torch.zeros_like(dst[name])
            w[:c, :c] = tensor
            w[c:, c:, 0, 0] = torch.eye(new - c)
            dst[name] = w
        elif name == "post_quant_conv.bias":
            dst[name] = torch.cat([tensor, tensor.new_zeros(new - c)])
        elif name == "decoder.conv_in.weight":
            dst[name] = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], new - c, *tensor.shape[2:])], dim=1)
        else:
            dst[name] = tensor
    out.load_state_dict(dst)
    return out.train(vae.training)
