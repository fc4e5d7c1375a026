"""Growing a trained captioner's multimodal decoder without changing what it writes."""
from __future__ import annotations

import torch

from dalle3_fast.models.captioner.model import CoCa


@torch.no_grad()
def deepen_multimodal_decoder(model: CoCa, multimodal_layers: int, seed: int = 0) -> CoCa:
    """A copy of ``model`` with ``multimodal_layers`` decoder blocks that scores every caption as it does.

    The old blocks keep their weights and come first; each new block starts with its self-attention,
    cross-attention and MLP output projections at zero, so it adds nothing to the residual stream until
    fine-tuning trains it (its other weights take the usual fresh initialisation, seeded by ``seed``).
    """
    old, new = model.config.multimodal_layers, int(multimodal_layers)
    if new < old:
        raise ValueError(f"deepen_multimodal_decoder: the captioner has {old} multimodal layers; {new} would remove "
                         "some")
    with torch.random.fork_rng(devices=[]):  # the new blocks' init is seeded; the caller's RNG state is left alone
        torch.manual_seed(seed)
        out = CoCa(model.config.replace(multimodal_layers=new), model.tokenizer)
    out.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("multimodal.blocks.") for k in missing), (missing, unexpected)
    for block in out.multimodal.blocks[old:]:
        for proj in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            proj.weight.zero_()
            proj.bias.zero_()
    return out.train(model.training)
