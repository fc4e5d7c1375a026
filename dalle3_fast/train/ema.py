"""Exponential moving average of the trained weights (fp32), swappable into the model for sampling."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .distributed import full_tensor, shard_like


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors by parameter name (a collective under FSDP: every rank must call it)."""
        return {n: full_tensor(t).cpu() for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:4]}; the checkpoint was made from another model")
        self.shadow = [shard_like(state[n].float(), s).to(s.device) for n, s in zip(self.names, self.shadow)]

    @contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (e.g. to draw samples), then restore."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
