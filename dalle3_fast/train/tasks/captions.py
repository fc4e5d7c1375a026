"""Caption choice at load time: DALL-E 3's synthetic/original blend and the CFG caption drop."""
from __future__ import annotations

import random


def blend_captions(records: list[dict], rng: random.Random, *, synthetic_ratio: float, synthetic_key: str = "dsc",
                   original_key: str = "alt", drop: float = 0.0) -> list[str]:
    """One caption per record: ``synthetic_key`` with probability ``synthetic_ratio`` (else ``original_key``),
    then replaced by the empty caption with probability ``drop`` (classifier-free guidance training).

    A record without the drawn key falls back to the other one; without both it is an error.
    """
    out = []
    for record in records:
        first, second = (synthetic_key, original_key) if rng.random() < synthetic_ratio else (original_key, synthetic_key)
        text = record.get(first) or record.get(second)
        if text is None:
            raise ValueError(f"sample {record.get('key', '?')!r} has neither a {synthetic_key!r} nor an "
                             f"{original_key!r} caption; recaption the shards or change task_options.*_key")
        out.append("" if rng.random() < drop else text)
    return out
