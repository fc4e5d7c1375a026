"""CoCa's two objectives: CLIP InfoNCE between image and text embeddings, next-token cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (B, E) rows; the backward sums the gradient over ranks and returns this
    rank's slice, so each rank's rows get the gradient of every rank's loss."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows and this rank's offset among them; identity outside torch.distributed.

    Every rank must hold the same number of rows (DDP with drop_last, as usual for contrastive training).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalized (B, E) embeddings; ``logit_scale`` is the exp'd temperature.

    Under torch.distributed the local rows are scored against every rank's batch (open_clip's
    local loss with gathered features), so negatives span the global batch.
    """
    all_image, offset = _gather_with_grad(image_emb)
    all_text, _ = _gather_with_grad(text_emb)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_per_image = logit_scale * image_emb @ all_text.t()
    logits_per_text = logit_scale * text_emb @ all_image.t()
    return 0.5 * (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels))


def caption_loss(logits: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor,
                 token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t; positions past ``lengths`` (pads) are ignored.

    logits (B, T, V) from inputs ``token_ids[:, :T]``; targets are ``token_ids[:, 1:T+1]``. With
    ``token_weights`` (V,) each target counts with its token's weight (a weighted mean over the targets).
    """
    T = logits.shape[1]
    targets = token_ids[:, 1:T + 1]
    valid = torch.arange(1, T + 1, device=token_ids.device)[None, :] < lengths[:, None].to(token_ids.device)
    targets = targets.masked_fill(~valid, -100)
    weight = None if token_weights is None else token_weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), weight=weight,
                           ignore_index=-100)
