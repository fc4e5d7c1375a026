"""Load a transformers T5 model (encoder or seq2seq) from a local directory, strictly.

transformers' ``from_pretrained`` re-creates a missing tensor with random values (and only logs it),
and falls back to unpickling ``pytorch_model.bin``. Here the model is built from ``config.json`` on
the meta device and takes ``model.safetensors`` (or its sharded index) as it is: a missing,
unexpected or mis-shaped tensor, an unreadable file or pickled weights are one ``CheckpointError``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dalle3_fast import io
from dalle3_fast.io import CheckpointError

WEIGHTS = "model.safetensors"
MODEL_TYPES = ("t5",)


def read_t5_config(directory: Path):
    from transformers import T5Config

    raw = io.read_config(directory)
    if raw.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{str(directory / io.CONFIG)!r} describes a {raw.get('model_type')!r} model, not a "
                              "T5 (model_type 't5')")
    try:
        return T5Config.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{str(directory / io.CONFIG)!r} is not a valid T5 config ({exc})") from exc


def load_t5(model_class, directory, *, dtype: torch.dtype | None = None):
    """``model_class`` (T5EncoderModel or T5ForConditionalGeneration) with the directory's weights, in eval mode.

    An encoder also loads from a whole T5ForConditionalGeneration checkpoint (its decoder tensors are
    checked against that model, then left out).
    """
    from transformers import T5EncoderModel, T5ForConditionalGeneration

    directory = Path(directory)
    config = read_t5_config(directory)
    state = io.load_safetensors_weights(directory, WEIGHTS)
    source = f"weights in {str(directory / WEIGHTS)!r}"
    with torch.device("meta"):
        model = model_class(config)
    wanted = set(model.state_dict())
    if model_class is T5EncoderModel and not set(state) <= wanted:
        with torch.device("meta"):
            whole = T5ForConditionalGeneration(config)
        if set(state) <= set(whole.state_dict()):  # the seq2seq layout: all of it must be there
            io.check_state_dict(whole, state, source)
            state = {k: v for k, v in state.items() if k in wanted}
    io.load_state_dict_strict(model, state, source, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {type(model).__name__} has tensors the file cannot give ({', '.join(left[:4])})")
    return model.to(dtype=dtype or torch.float32).eval()
