"""Tokenizers for the text encoder and the captioner.

``SentencePieceTokenizer`` is trained in memory on a list of strings with
sentencepiece's own trainer and saved as its ``.model`` file (plain protobuf bytes).
``HFTokenizer`` wraps a transformers tokenizer (e.g. T5's) read from a local directory.
Both turn prompts into a padded id batch the same way (``encode``), so a model does not
care which one it was given.

Ids: pad 0, unk 1, bos 2, eos 3 for our tokenizers (T5 expects pad 0 too).
"""
from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from dalle3_fast.io import CheckpointError, atomic_write_bytes

SPM_FILE = "spiece.model"
MARKER_FILE = "dalle3_tokenizer.json"


@dataclass
class TokenizedBatch:
    """A right-padded batch: ``ids`` (B, L) int64, ``lengths`` (B,) int32, ``truncated`` (B,) bool."""

    ids: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        return (torch.arange(self.ids.shape[1])[None, :] < self.lengths[:, None].long()).long()

    def to(self, device) -> "TokenizedBatch":
        return TokenizedBatch(self.ids.to(device), self.lengths.to(device), self.truncated.to(device))


def _as_list(texts, who: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{who}: `texts` must be a string or a list of strings, got an element of type {bad[0]}")
    return texts


class _BatchEncoder:
    """Turns per-text id lists into one padded batch; subclasses give ``_encode_one`` and the special ids."""

    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def _encode_one(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        add_bos: bool = False,
        add_eos: bool = True,
        truncation: bool = True,
        pad_to: int | None = None,
    ) -> TokenizedBatch:
        """Tokenize ``texts`` into a right-padded batch.

        ``max_length`` counts the special tokens. A longer text is cut to ``max_length``
        keeping its EOS last (and flagged in ``truncated``) when ``truncation`` is true;
        otherwise it is a ValueError naming the text and the limit. ``pad_to`` pads to a
        fixed width instead of the longest text.
        """
        texts = _as_list(texts, "encode")
        if not texts:
            raise ValueError("encode: `texts` is empty; pass at least one string")
        if add_bos and self.bos_id is None:
            raise ValueError("encode: this tokenizer has no BOS token; pass add_bos=False")
        if max_length is not None and max_length < 1 + int(add_bos) + int(add_eos):
            raise ValueError(f"encode: `max_length`={max_length} leaves no room for a token next to BOS/EOS")
        rows, truncated = [], []
        for i, text in enumerate(texts):
            body = self._encode_one(text)
            row = ([self.bos_id] if add_bos else []) + body + ([self.eos_id] if add_eos else [])
            cut = max_length is not None and len(row) > max_length
            if cut:
                if not truncation:
                    raise ValueError(
                        f"encode: text {i} has {len(row)} tokens but at most max_length={max_length} fit; "
                        "shorten it or pass truncation=True")
                row = row[: max_length - 1] + ([self.eos_id] if add_eos else row[max_length - 1: max_length])
            rows.append(row)
            truncated.append(cut)
        width = max(len(r) for r in rows)
        if pad_to is not None:
            if pad_to < width:
                raise ValueError(f"encode: `pad_to`={pad_to} is shorter than the longest encoded text ({width} tokens)")
            width = pad_to
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        return TokenizedBatch(ids, lengths, torch.tensor(truncated, dtype=torch.bool))


class SentencePieceTokenizer(_BatchEncoder):
    """A SentencePiece model with pad 0 / unk 1 / bos 2 / eos 3."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise ValueError("SentencePieceTokenizer: `model_proto` must be the non-empty bytes of a .model file")
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.pad_id = self._sp.pad_id()
        self.unk_id = self._sp.unk_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        if self.pad_id < 0 or self.eos_id is None:
            raise ValueError("SentencePieceTokenizer: the model has no pad or eos piece; train it with "
                             "SentencePieceTokenizer.train so the special ids exist")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1000,
        *,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        byte_fallback: bool = False,
        seed_sentencepiece_size: int = 100_000,
    ) -> "SentencePieceTokenizer":
        """Train on ``texts`` in memory. ``vocab_size`` is an upper bound: a small corpus gives fewer pieces.

        BPE is the default: on small caption corpora sentencepiece's unigram trainer stops far below the
        requested size (near character level), while BPE learns whole words.
        """
        import sentencepiece as spm

        texts = _as_list(texts, "SentencePieceTokenizer.train")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("SentencePieceTokenizer.train: `texts` has no non-empty string to learn from")
        if model_type not in ("unigram", "bpe", "char", "word"):
            raise ValueError(f"SentencePieceTokenizer.train: unknown model_type {model_type!r}; "
                             "use 'unigram', 'bpe', 'char' or 'word'")
        if vocab_size < 8:
            raise ValueError(f"SentencePieceTokenizer.train: `vocab_size`={vocab_size} is too small; use at least 8")
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            seed_sentencepiece_size=seed_sentencepiece_size, num_threads=1, minloglevel=2,
        )
        return cls(writer.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def _encode_one(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str | list[str]:
        """Ids -> text. A 1-D sequence gives a string, a 2-D one a list; stops at EOS, drops pad/bos."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(i)
        return self._sp.decode(out).strip()  # encode drops outer whitespace, so a stray "▁" piece means nothing

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        atomic_write_bytes(directory / SPM_FILE, self._proto)
        marker = {"kind": "sentencepiece", "file": SPM_FILE, "pad_id": self.pad_id, "unk_id": self.unk_id,
                  "bos_id": self.bos_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size}
        atomic_write_bytes(directory / MARKER_FILE, (json.dumps(marker, indent=2) + "\n").encode())

    @classmethod
    def from_pretrained(cls, directory) -> "SentencePieceTokenizer":
        path = Path(directory) / SPM_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} is missing; save one with "
                                    "SentencePieceTokenizer.save_pretrained")
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{str(path)!r} is not a valid SentencePiece model ({exc})") from exc

    def __eq__(self, other) -> bool:
        return isinstance(other, SentencePieceTokenizer) and other._proto == self._proto

    def __hash__(self) -> int:
        return hash(self._proto)


class HFTokenizer(_BatchEncoder):
    """A transformers tokenizer (T5's) from a local directory, behind the same ``encode``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.pad_id is None or self.eos_id is None:
            raise ValueError(f"HFTokenizer: {type(tokenizer).__name__} has no pad or eos token")

    @classmethod
    def from_pretrained(cls, directory) -> "HFTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode_one(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str | list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory) -> SentencePieceTokenizer | HFTokenizer:
    """Our SentencePiece tokenizer if ``directory`` holds one (dalle3_tokenizer.json), else a transformers one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if (directory / MARKER_FILE).is_file():
        return SentencePieceTokenizer.from_pretrained(directory)
    hf_files = ("tokenizer.json", "tokenizer_config.json", SPM_FILE)
    if any((directory / f).is_file() for f in hf_files):
        return HFTokenizer.from_pretrained(directory)
    raise FileNotFoundError(f"no tokenizer in {str(directory)!r}: expected {MARKER_FILE} + {SPM_FILE} "
                            f"(ours) or one of {', '.join(hf_files)} (transformers)")


def load_model_tokenizer(directory) -> SentencePieceTokenizer | HFTokenizer:
    """``load_tokenizer`` for the tokenizer of a model directory: a missing or unreadable file is a
    ``CheckpointError`` (the model directory is incomplete or corrupt)."""
    try:
        return load_tokenizer(directory)
    except CheckpointError:
        raise
    except Exception as exc:  # sentencepiece, tokenizers and transformers raise many types for bad files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"the tokenizer in {str(directory)!r} cannot be loaded: {detail}") from exc


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this package (and torch's decorators), so a warning
    points at the user's line."""
    internal = (str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def check_truncation(batch: TokenizedBatch, max_length: int, truncate: bool, who: str) -> None:
    """The policy for prompts longer than ``max_length`` tokens: warn when ``truncate``, else one clear error.

    ``batch`` must come from ``encode(..., max_length=max_length, truncation=True)``.
    """
    cut = batch.truncated.nonzero().flatten().tolist()
    if not cut:
        return
    if truncate:
        warnings.warn(f"{who}: {len(cut)} prompt(s) (index {', '.join(map(str, cut[:8]))}) are longer than "
                      f"{max_length} tokens and were truncated", stacklevel=_caller_stacklevel())
        return
    raise ValueError(f"{who}: prompt {cut[0]} is longer than the limit of {max_length} tokens; "
                     "shorten it, raise max_tokens, or pass truncate=True")
