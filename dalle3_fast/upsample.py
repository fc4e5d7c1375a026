"""Prompt upsampling: a short prompt -> a DSC-style "revised prompt", matching what the U-Net was trained on.

Two backends share ``upsample(prompts: list[str]) -> list[str]``:

- :class:`OpenAIUpsampler`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (the official API,
  vLLM, llama.cpp's server...), asked for ONE 15-80 word description in the descriptive-caption style;
- :class:`LocalUpsampler`: a small T5 seq2seq trained on the scene world's (SSC -> DSC) caption pairs
  with our SentencePiece tokenizer; needs no network.

    python -m dalle3_fast.upsample --prompt "a red circle" --backend local
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 DALLE3_UPSAMPLE_MODEL=my-llm \\
        python -m dalle3_fast.upsample --prompt "a red circle" --backend openai
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Sequence

import torch

from dalle3_fast.io import CheckpointError, atomic_write_bytes

INSTRUCTION = (
    "You rewrite prompts for a text-to-image model. Reply with ONE description of the image, between 15 and 80 "
    "words, and nothing else: no preamble, no list, no alternatives. Describe the main subject, its surroundings, "
    "the background, any text written in the image (in double quotes), the style and the colours. Keep every "
    "detail the user gives (counts, colours, shapes, sizes, positions, written words) and add plausible details "
    "only where the prompt is silent. When asked to modify a description, rewrite the whole description."
)
ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = "OPENAI_BASE_URL", "DALLE3_UPSAMPLE_MODEL", "OPENAI_API_KEY"
OFFICIAL_BASE_URL = "https://api.openai.com/v1"
SETTINGS_FILE = "dalle3_upsampler.json"
TOKENIZER_DIR = "tokenizer"


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("upsample: `prompts` must be a list of strings, got a single str; wrap it in a list")
    prompts = list(prompts)
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("upsample: every prompt must be a str")
    return prompts


_STUTTER = re.compile(r"\b(\w+)(?:\s+\1\b){2,}")


def _clean(text: str) -> str:
    """One paragraph, without surrounding quotes, a "Description:" style label or a word stuck in a loop
    (a small greedy decoder's failure mode: "star star star ...")."""
    text = _STUTTER.sub(r"\1", " ".join(text.strip().split()))
    for label in ("Revised prompt:", "Description:", "Prompt:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


_FUNCTION_WORDS = frozenset("a an the and or of on in at to with its it is are there one two three four five".split())


def keeps_content(prompt: str, revised: str) -> bool:
    """Whether ``revised`` still names every content word of ``prompt`` (a small model's rewrite that drops
    or swaps the subject — "a red circle" -> "a yellow star" — is no revision of it)."""
    words = set(re.findall(r"[a-z]+", revised.lower()))
    return all(w in words for w in re.findall(r"[a-z]+", prompt.lower()) if w not in _FUNCTION_WORDS)


class OpenAIUpsampler:
    """Revised prompts from an OpenAI-compatible chat endpoint (one request per prompt).

    ``base_url``, ``model`` and ``api_key`` default to $OPENAI_BASE_URL (else the official API),
    $DALLE3_UPSAMPLE_MODEL and $OPENAI_API_KEY. A key is required only for the official API; a
    self-hosted endpoint that ignores keys gets a placeholder.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, temperature: float = 0.7, max_retries: int = 2):
        self.base_url = (base_url or os.environ.get(ENV_BASE_URL) or OFFICIAL_BASE_URL).rstrip("/")
        self.model = model or os.environ.get(ENV_MODEL)
        if not self.model:
            raise ValueError(f"OpenAIUpsampler: no model given; pass --upsample-model (or `model=`) or set ${ENV_MODEL}")
        api_key = api_key or os.environ.get(ENV_API_KEY)
        if not api_key:
            if self.base_url == OFFICIAL_BASE_URL:
                raise ValueError(f"OpenAIUpsampler: the OpenAI API needs a key; set ${ENV_API_KEY} or pass `api_key`")
            api_key = "unused"
        from openai import OpenAI

        self.temperature = temperature
        self._client = OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"Prompt: {prompt}"}]

    def upsample(self, prompts: Sequence[str]) -> list[str]:
        import openai

        out = []
        for prompt in _check_prompts(prompts):
            try:
                reply = self._client.chat.completions.create(model=self.model, messages=self.messages(prompt),
                                                             temperature=self.temperature, n=1)
            except openai.OpenAIError as exc:
                raise RuntimeError(f"upsampling endpoint {self.base_url} failed: {exc}") from exc
            if not reply.choices or not (reply.choices[0].message.content or "").strip():
                raise RuntimeError(f"upsampling endpoint {self.base_url} returned no text for {prompt!r}")
            out.append(_clean(reply.choices[0].message.content))
        return out


def world_caption_pairs(seed: int, count: int) -> list[tuple[str, str]]:
    """(SSC, DSC) caption pairs of ``count`` scene-world scenes."""
    from dalle3_fast.data.world import captions, sample_scene, scene_seed

    pairs = []
    for i in range(count):
        s = scene_seed(seed, i)
        caps = captions(sample_scene(s), s)
        pairs.append((caps["ssc"], caps["dsc"]))
    return pairs


def tiny_seq2seq_config(vocab_size: int, eos_id: int, d_model: int = 96, layers: int = 2, heads: int = 4):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                    num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    dropout_rate=0.0, pad_token_id=0, eos_token_id=eos_id, decoder_start_token_id=0,
                    tie_word_embeddings=True)


class LocalUpsampler:
    """A small T5ForConditionalGeneration (transformers) + our SentencePiece tokenizer, greedy decoding."""

    def __init__(self, model, tokenizer, *, max_input_tokens: int = 64, max_new_tokens: int = 96):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_input_tokens, self.max_new_tokens = max_input_tokens, max_new_tokens

    @classmethod
    def from_pretrained(cls, directory) -> "LocalUpsampler":
        """Load strictly (config.json + model.safetensors + tokenizer/): damage is a ``CheckpointError``."""
        from transformers import GenerationConfig, T5ForConditionalGeneration

        from dalle3_fast.io import read_config
        from dalle3_fast.models.t5_loading import load_t5
        from dalle3_fast.models.tokenizer import load_model_tokenizer

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{str(directory)!r} is not an upsampler directory (config.json is missing); "
                                  "make one with LocalUpsampler.save_pretrained")
        settings = read_config(directory, SETTINGS_FILE) if (directory / SETTINGS_FILE).is_file() else {}
        unknown = sorted(set(settings) - {"max_input_tokens", "max_new_tokens"})
        if unknown or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in settings.values()):
            raise CheckpointError(f"{str(directory / SETTINGS_FILE)!r} must hold positive ints max_input_tokens and "
                                  f"max_new_tokens only, got {settings}")
        model = load_t5(T5ForConditionalGeneration, directory)
        if (directory / "generation_config.json").is_file():
            read_config(directory, "generation_config.json")  # a readable JSON object, or a CheckpointError
            try:
                model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
            except (OSError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{str(directory / 'generation_config.json')!r} is not a valid generation "
                                      f"config ({exc})") from exc
        return cls(model, load_model_tokenizer(directory / TOKENIZER_DIR), **settings)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        settings = {"max_input_tokens": self.max_input_tokens, "max_new_tokens": self.max_new_tokens}
        atomic_write_bytes(directory / SETTINGS_FILE, (json.dumps(settings) + "\n").encode())

    @classmethod
    def train_on_world(cls, *, steps: int = 1500, batch_size: int = 32, seed: int = 0, pairs: int = 20000,
                       tokenizer_dir=None, lr: float = 2e-3, d_model: int = 96, progress: bool = True) -> "LocalUpsampler":
        """Train a new upsampler on (SSC -> DSC) pairs of world ``seed`` (tokenizer: ``tokenizer_dir`` or a new one)."""
        from tqdm.auto import tqdm
        from transformers import T5ForConditionalGeneration

        from dalle3_fast.models.tokenizer import SentencePieceTokenizer, load_tokenizer

        data = world_caption_pairs(seed + 7, pairs)
        if tokenizer_dir is not None:
            tokenizer = load_tokenizer(tokenizer_dir)
        else:
            tokenizer = SentencePieceTokenizer.train([t for pair in data[:4000] for t in pair], vocab_size=1000)
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(tiny_seq2seq_config(tokenizer.vocab_size, tokenizer.eos_id, d_model))
        upsampler = cls(model, tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        rng = random.Random(f"upsampler:{seed}")
        model.train()
        bar = tqdm(range(steps), unit="step", disable=not progress, file=sys.stderr, desc="upsampler")
        for step in bar:
            for group in opt.param_groups:  # linear warm-up, then linear decay to 10 %
                group["lr"] = lr * min((step + 1) / 50, 1.0 - 0.9 * step / steps)
            batch = [data[rng.randrange(len(data))] for _ in range(batch_size)]
            src = tokenizer.encode([s for s, _ in batch], max_length=upsampler.max_input_tokens)
            tgt = tokenizer.encode([t for _, t in batch], max_length=upsampler.max_new_tokens)
            labels = tgt.ids.masked_fill(tgt.attention_mask == 0, -100)
            loss = model(input_ids=src.ids, attention_mask=src.attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        return upsampler

    @torch.no_grad()
    def upsample(self, prompts: Sequence[str]) -> list[str]:
        prompts = _check_prompts(prompts)
        if not prompts:
            return []
        batch = self.tokenizer.encode(prompts, max_length=self.max_input_tokens, truncation=True)
        device = next(self.model.parameters()).device
        out = self.model.generate(input_ids=batch.ids.to(device), attention_mask=batch.attention_mask.to(device),
                                  max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        # a revision that is empty or loses what the user asked for leaves the prompt as the user wrote it
        revised = (_clean(text) for text in self.tokenizer.decode(out.cpu()))
        return [text if text and keeps_content(prompt, text) else prompt for prompt, text in zip(prompts, revised)]


def load_upsampler(backend: str, *, pipeline_dir=None, base_url=None, model=None, api_key=None):
    """``backend`` "none" -> None, "local" -> the pipeline's LocalUpsampler, "openai" -> OpenAIUpsampler."""
    if backend == "none":
        return None
    if backend == "openai":
        return OpenAIUpsampler(base_url, model, api_key)
    if backend == "local":
        from dalle3_fast.assets import TINY_PIPELINE
        from dalle3_fast.io import read_config

        directory = Path(pipeline_dir) if pipeline_dir is not None else TINY_PIPELINE
        index = read_config(directory, "model_index.json")
        if not index.get("upsampler"):
            raise CheckpointError(f"the pipeline {str(directory)!r} has no local upsampler; use --upsample openai "
                                  "or none")
        return LocalUpsampler.from_pretrained(directory / index["upsampler"])
    raise ValueError(f"upsample backend {backend!r} is unknown; use none, local or openai")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle3_fast.upsample",
                                description="Rewrite a short prompt into a descriptive (DSC-style) revised prompt.")
    p.add_argument("--prompt", required=True, action="append",
                   help="the prompt to revise (repeat the flag for several prompts)")
    p.add_argument("--backend", choices=("local", "openai"), default="local",
                   help="local: the small seq2seq shipped in the pipeline (no network); openai: an "
                        "OpenAI-compatible chat endpoint")
    p.add_argument("--pipeline", default=None,
                   help="pipeline directory whose upsampler/ the local backend uses (default: the embedded one)")
    p.add_argument("--base-url", default=None, help=f"openai backend: API base URL (default ${ENV_BASE_URL}, else "
                                                    f"{OFFICIAL_BASE_URL})")
    p.add_argument("--model", default=None, help=f"openai backend: chat model name (default ${ENV_MODEL})")
    p.add_argument("--api-key", default=None, help=f"openai backend: API key (default ${ENV_API_KEY})")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        upsampler = load_upsampler(args.backend, pipeline_dir=args.pipeline, base_url=args.base_url,
                                   model=args.model, api_key=args.api_key)
        for revised in upsampler.upsample(args.prompt):
            print(revised)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
