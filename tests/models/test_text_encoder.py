"""SentencePiece tokenizer and the T5 text encoder wrapper (transformers is the oracle)."""
import random
import warnings

import pytest
import sentencepiece as spm
import torch

from dalle3_fast.io import CheckpointError
from dalle3_fast.models.text_encoder import T5TextEncoder
from dalle3_fast.models.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
RELATIONS = ["above", "below", "left of", "right of", "next to"]


def captions(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(COLOURS, 2)
        s, t = rng.sample(SHAPES, 2)
        out.append(f"a {a} {s} {rng.choice(RELATIONS)} a {b} {t} on a {rng.choice(COLOURS)} background")
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer.train(captions(400), vocab_size=96)


def test_tokenizer_round_trip_and_special_ids(tokenizer):
    texts = captions(5, seed=1)
    batch = tokenizer.encode(texts, add_bos=True, add_eos=True)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert batch.ids.dtype == torch.long and batch.lengths.dtype == torch.int32
    assert batch.ids.shape == (5, int(batch.lengths.max()))
    for row, n in zip(batch.ids, batch.lengths.tolist()):
        assert row[0] == tokenizer.bos_id and row[n - 1] == tokenizer.eos_id
        assert (row[n:] == tokenizer.pad_id).all()
        assert tokenizer.eos_id not in row[1:n - 1].tolist() and tokenizer.unk_id not in row.tolist()
    assert tokenizer.decode(batch.ids) == texts
    assert not batch.truncated.any()
    assert tokenizer.decode([5, 6, tokenizer.eos_id, 7, 8]) == tokenizer.decode([5, 6])
    assert tokenizer.vocab_size <= 96


def test_tokenizer_truncation(tokenizer):
    text = captions(1, seed=2)[0]
    full = tokenizer.encode([text], add_bos=True).ids[0]
    cut = tokenizer.encode([text, "a red star"], max_length=6, add_bos=True)
    assert cut.truncated.tolist() == [True, False]
    assert cut.ids.shape[1] == 6 and cut.lengths[0] == 6
    assert cut.ids[0].tolist() == full[:5].tolist() + [tokenizer.eos_id]
    with pytest.raises(ValueError, match="max_length=6"):
        tokenizer.encode([text], max_length=6, truncation=False)
    padded = tokenizer.encode(["a red star"], pad_to=12)
    assert padded.ids.shape == (1, 12)
    with pytest.raises(ValueError, match="pad_to"):
        tokenizer.encode([text], pad_to=2)


def test_tokenizer_save_load_plain_model_file(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    # The file is sentencepiece's own protobuf: sentencepiece reads it without us.
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    assert sp.vocab_size() == tokenizer.vocab_size
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer) and loaded == tokenizer
    texts = captions(3, seed=3)
    assert torch.equal(loaded.encode(texts).ids, tokenizer.encode(texts).ids)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="no non-empty"):
        SentencePieceTokenizer.train(["", "  "])
    with pytest.raises(ValueError, match="list of strings"):
        SentencePieceTokenizer.train(["ok", 3])


def _direct(encoder, ids, lengths):
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        return encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_t5_wrapper_matches_transformers(tokenizer):
    encoder = T5TextEncoder.tiny(tokenizer, d_model=64, num_layers=2, num_heads=4, seed=0)
    prompts = ["a red star", captions(1, seed=4)[0], "a blue circle above a green square"]
    emb, lengths = encoder.encode(prompts)
    batch = tokenizer.encode(prompts, add_bos=False, add_eos=True)
    assert lengths.dtype == torch.int32 and torch.equal(lengths, batch.lengths)
    assert emb.shape == (3, batch.ids.shape[1], 64)
    expected = _direct(encoder, batch.ids, batch.lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb[b, :n], expected[b, :n], rtol=0, atol=0)
        assert (emb[b, n:] == 0).all()
    # Padding is masked: a prompt alone gives the same embeddings as inside a padded batch.
    alone, alone_len = encoder.encode([prompts[0]])
    torch.testing.assert_close(alone[0, :alone_len[0]], emb[0, :alone_len[0]], rtol=1e-5, atol=1e-6)


def test_t5_over_length_policy(tokenizer):
    encoder = T5TextEncoder.tiny(tokenizer, max_tokens=8, seed=0)
    long_prompt = captions(1, seed=5)[0]
    with pytest.warns(UserWarning, match="longer than 8 tokens"):
        emb, lengths = encoder.encode([long_prompt, "a red star"])
    assert emb.shape[1] == 8 and lengths[0] == 8
    with pytest.raises(ValueError, match="limit of 8 tokens"):
        encoder.encode([long_prompt], truncate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["a red star"], truncate=False)


def test_t5_save_load_round_trip(tokenizer, tmp_path):
    encoder = T5TextEncoder.tiny(tokenizer, max_tokens=32, seed=1)
    encoder.save_pretrained(tmp_path / "te")
    assert (tmp_path / "te" / "model.safetensors").is_file()
    loaded = T5TextEncoder.from_pretrained(tmp_path / "te")
    assert loaded.max_tokens == 32 and loaded.tokenizer == tokenizer
    prompts = captions(2, seed=6)
    torch.testing.assert_close(loaded.encode(prompts), encoder.encode(prompts), rtol=0, atol=0)


def test_t5_with_transformers_tokenizer(tokenizer, tmp_path):
    from transformers import T5Tokenizer

    tokenizer.save_pretrained(tmp_path / "sp")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "spiece.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(4, sp.vocab_size())]
    hf = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces, extra_ids=0)
    encoder = T5TextEncoder.tiny(tokenizer, seed=2)  # same vocab size; ids mean different pieces, fine here
    encoder = T5TextEncoder(encoder.model, HFTokenizer(hf), max_tokens=64)
    prompts = ["a red star", "a blue circle above a green square"]
    reference = hf(prompts, padding=True, return_tensors="pt")
    batch = encoder.tokenize(prompts)
    assert torch.equal(batch.ids, reference.input_ids)
    assert torch.equal(batch.attention_mask, reference.attention_mask)
    encoder.save_pretrained(tmp_path / "te")
    loaded = T5TextEncoder.from_pretrained(tmp_path / "te")
    assert isinstance(loaded.tokenizer, HFTokenizer)
    torch.testing.assert_close(loaded.encode(prompts), encoder.encode(prompts), rtol=0, atol=0)


def test_t5_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="google/t5-v1_1-xxl.*nothing is downloaded"):
        T5TextEncoder.from_pretrained("google/t5-v1_1-xxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        T5TextEncoder.from_pretrained(tmp_path / "empty")
