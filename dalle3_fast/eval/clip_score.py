"""CLIP score as the DALL-E 3 paper defines it: 100 x cosine(image embedding, text embedding), averaged.

Scorers: ``captioner:DIR`` (our CoCa captioner's contrastive towers) or ``open_clip:ARCH:FILE`` (an
open_clip model from a local checkpoint file; needs ``pip install open_clip_torch``; nothing is
downloaded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


class ClipScorer:
    """``score(images (B,3,H,W) in [-1, 1], texts) -> (B,)`` 100 x cosine per pair."""

    name: str

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class CaptionerScorer(ClipScorer):
    def __init__(self, directory, device="cpu"):
        from dalle3_fast.models.captioner import CoCa

        self.model = CoCa.from_pretrained(directory, device=device).eval()
        self.name = f"captioner:{directory}"

    @torch.no_grad()
    def score(self, images, texts):
        return self.model.clip_score(images.float(), list(texts)).float().cpu()


class OpenClipScorer(ClipScorer):
    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, arch: str, checkpoint, device="cpu"):
        from dalle3_fast.io import CheckpointError

        if Path(checkpoint).suffix != ".safetensors":  # open_clip would unpickle anything else
            raise CheckpointError(f"--scorer open_clip checkpoint {str(checkpoint)!r} is not a .safetensors file: "
                                  "pickled checkpoints are never loaded; convert it to safetensors")
        try:
            import open_clip
        except ImportError as exc:
            raise ValueError("--scorer open_clip:... needs open_clip (pip install open_clip_torch)") from exc
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--scorer open_clip checkpoint {str(checkpoint)!r} does not exist")
        try:  # open_clip loads .safetensors with safetensors and strict=True
            self.model = open_clip.create_model(arch, pretrained=str(checkpoint), device=device).eval()
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"--scorer open_clip checkpoint {str(checkpoint)!r} does not load into "
                                  f"{arch}: {detail}") from exc
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.device = device
        self.name = f"open_clip:{arch}:{checkpoint}"

    @torch.no_grad()
    def score(self, images, texts):
        x = (images.float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        mean, std = torch.tensor(self.MEAN).view(1, 3, 1, 1), torch.tensor(self.STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)
        return (100.0 * (img * txt).sum(-1)).cpu()


def load_scorer(spec: str | None, device="cpu") -> ClipScorer | None:
    """``None`` -> no CLIP score; ``captioner:DIR``; ``open_clip:ARCH:FILE``."""
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "captioner" and rest:
        return CaptionerScorer(rest, device)
    if kind == "open_clip" and ":" in rest:
        arch, _, checkpoint = rest.partition(":")
        return OpenClipScorer(arch, checkpoint, device)
    raise ValueError(f"--scorer {spec!r} is not understood; use captioner:DIR or open_clip:ARCH:CHECKPOINT_FILE")
