"""CoCa captioner: loss, KV-cached decoding against full recomputation, scoring, files, errors."""
import math
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle3_fast import ops
from dalle3_fast.io import CheckpointError
from dalle3_fast.models.captioner import CoCa, CoCaConfig
from dalle3_fast.models.tokenizer import SentencePieceTokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]

# Smaller than CoCaConfig.tiny() so the whole file runs in seconds.
TEST_CONFIG = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=1, vision_heads=2, pooler_heads=2,
                   caption_queries=8, max_text_len=24, text_width=64, text_heads=2, text_layers=1,
                   multimodal_layers=1, embed_dim=32)


def captions(n, seed=0):
    rng = random.Random(seed)
    return [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} above a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
            for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer.train(captions(300), vocab_size=64)


def make_model(tokenizer, seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = CoCa.from_tokenizer(tokenizer, CoCaConfig(**{**TEST_CONFIG, **overrides}))
    return model.to(dtype).eval()


def images(n, seed=0, size=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(dtype)


def test_tokenize_layout(tokenizer):
    model = make_model(tokenizer)
    batch = model.tokenize(["a red star above a blue circle", "a red star"])
    assert (batch.ids[:, 0] == tokenizer.bos_id).all()
    assert batch.ids[1, batch.lengths[1] - 1] == tokenizer.eos_id
    assert model.config.vocab_size == tokenizer.vocab_size


def test_loss_finite_decreasing_and_every_parameter_trained(tokenizer):
    model = make_model(tokenizer).train()
    texts = captions(6, seed=1)
    batch = model.tokenize(texts)
    x = images(6, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for step in range(25):
        out = model(x, batch.ids, batch.lengths)
        assert set(out) == {"loss", "contrastive", "caption", "logit_scale"}
        assert all(torch.isfinite(v) for v in out.values())
        torch.testing.assert_close(out["loss"].detach(), 1.0 * out["contrastive"] + 2.0 * out["caption"])
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:  # DDP needs every parameter in the graph of every step
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            assert not unused, f"parameters without gradient: {unused}"
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    assert history[-1]["caption"] < 0.5 * history[0]["caption"]
    assert history[-1]["contrastive"] < 0.5 * history[0]["contrastive"]
    # Overfit pairs are retrieved: each image's best text is its own.
    with torch.no_grad():
        sim = model.encode_image(x) @ model.encode_text(texts).t()
    assert torch.equal(sim.argmax(1), torch.arange(6))
    # pad_mask is the same as lengths.
    pad_mask = torch.arange(batch.ids.shape[1])[None] >= batch.lengths[:, None]
    with torch.no_grad():
        a = model(x, batch.ids, batch.lengths)
        b = model.loss(x, batch.ids, pad_mask=pad_mask)
    torch.testing.assert_close(a, b)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model(tokenizer, seed=11).train()
    batch = model.tokenize(captions(2, seed=11))
    x = images(2, seed=11)
    grads = []
    for enabled in (False, True):
        model.enable_gradient_checkpointing(enabled)
        model.zero_grad()
        model(x, batch.ids, batch.lengths)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # one block in each of the three towers, only when enabled
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_loss_weights_and_pad_tokens_ignored(tokenizer):
    model = make_model(tokenizer, contrastive_weight=0.5, caption_weight=3.0)
    batch = model.tokenize(captions(3, seed=2))
    x = images(3, seed=2)
    with torch.no_grad():
        out = model(x, batch.ids, batch.lengths)
        torch.testing.assert_close(out["loss"], 0.5 * out["contrastive"] + 3.0 * out["caption"])
        # Whatever sits in the padding (and extra padding) changes nothing.
        noisy = torch.cat([batch.ids, torch.zeros(3, 2, dtype=torch.long)], 1)
        pads = torch.arange(noisy.shape[1])[None] >= batch.lengths[:, None]
        noisy[pads] = torch.randint(4, tokenizer.vocab_size, (int(pads.sum()),))
        out2 = model(x, noisy, batch.lengths)
    torch.testing.assert_close(out2, out)


def test_token_weights_weigh_each_target_of_the_caption_loss(tokenizer):
    from dalle3_fast.models.captioner.loss import caption_loss

    g = torch.Generator().manual_seed(3)
    V, lengths = tokenizer.vocab_size, torch.tensor([7, 4])
    ids = torch.randint(4, V, (2, 7), generator=g)
    logits = torch.randn(2, 6, V, generator=g, dtype=torch.float64)
    weights = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    per_target, total = [], 0.0
    for b in range(2):
        for t in range(int(lengths[b]) - 1):  # target ids[b, t + 1], the rest is padding
            w = weights[ids[b, t + 1]]
            per_target.append(-w * torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]])
            total += w
    torch.testing.assert_close(caption_loss(logits, ids, lengths, weights), (torch.stack(per_target).sum() / total).float())
    torch.testing.assert_close(caption_loss(logits, ids, lengths, torch.ones(V, dtype=torch.float64)),
                               caption_loss(logits, ids, lengths))

    model = make_model(tokenizer)
    batch = model.tokenize(captions(3, seed=2))
    with torch.no_grad():
        plain = model(images(3), batch.ids, batch.lengths)
        above = torch.ones(V)
        above[tokenizer.encode(["above"], add_eos=False).ids[0, 0]] = 10.0
        weighted = model(images(3), batch.ids, batch.lengths, token_weights=above)
    assert weighted["caption"] != plain["caption"]
    torch.testing.assert_close(weighted["contrastive"], plain["contrastive"])
    with pytest.raises(ValueError, match="token_weights"):
        model(images(3), batch.ids, batch.lengths, token_weights=torch.ones(V + 1))


def test_deepened_decoder_scores_as_before_and_trains_its_new_layers(tokenizer):
    from dalle3_fast.models.captioner import deepen_multimodal_decoder

    model = make_model(tokenizer, multimodal_layers=1)
    batch = model.tokenize(captions(3, seed=4))
    x = images(3, seed=4)
    state = torch.get_rng_state()
    deep = deepen_multimodal_decoder(model, 3).eval()
    assert torch.equal(torch.get_rng_state(), state)
    assert deep.config.multimodal_layers == 3 and len(deep.multimodal.blocks) == 3
    with torch.no_grad():
        torch.testing.assert_close(deep(x, batch.ids, batch.lengths), model(x, batch.ids, batch.lengths))
    assert deep.generate(x, max_new_tokens=8) == model.generate(x, max_new_tokens=8)
    deep.train()
    deep(x, batch.ids, batch.lengths)["loss"].backward()
    for block in deep.multimodal.blocks[1:]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in
                   (block.attn.proj.weight, block.cross_attn.proj.weight, block.mlp.fc2.weight))
    with pytest.raises(ValueError, match="would remove"):
        deepen_multimodal_decoder(deep, 2)


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_kv_cache_equals_full_recomputation(tokenizer, method):
    model = make_model(tokenizer, seed=3, dtype=torch.float64)
    x = images(3, seed=3, dtype=torch.float64)
    kwargs = dict(max_new_tokens=12, method=method, num_beams=3, length_penalty=0.7, top_p=0.8, temperature=1.3)
    cached = model.generate_ids(x, generator=torch.Generator().manual_seed(7), use_cache=True, **kwargs)
    full = model.generate_ids(x, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.scores, full.scores, rtol=1e-12, atol=1e-12)
    if method != "beam":
        assert cached.logits.shape == (3, cached.sequences.shape[1] - 1, tokenizer.vocab_size)
        torch.testing.assert_close(cached.logits, full.logits, rtol=1e-10, atol=1e-10)


def test_cache_with_a_multi_token_continuation(tokenizer):
    model = make_model(tokenizer, seed=4)
    x = images(2, seed=4)
    ids = model.tokenize(captions(2, seed=4)).ids[:, :9]
    with torch.no_grad():
        image_kv = model.multimodal.image_kv(model.image_features(x)[1])
        full = model.token_logits(ids, image_kv)
        caches = model.new_caches(2, 9, torch.float32, x.device)
        first = model.token_logits(ids[:, :4], image_kv, caches)
        rest = model.token_logits(ids[:, 4:], image_kv, caches)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def _sequence_logprob(model, x, sequence):
    """Sum of log p(token) over a BOS-led sequence, pad/bos excluded from the softmax as decoding does."""
    c = model.config
    with torch.no_grad():
        image_kv = model.multimodal.image_kv(model.image_features(model.prepare_images(x[None]))[1])
        logits = model.token_logits(sequence[None, :-1], image_kv)[0].double()
    logits[:, [c.pad_id, c.bos_id]] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, sequence[1:, None]).sum().item()


def test_beam_search_scores_and_greedy_limit(tokenizer):
    model = make_model(tokenizer, seed=5)
    x = images(2, seed=5)
    beam = model.generate_ids(x, method="beam", num_beams=4, length_penalty=1.0, max_new_tokens=8)
    for b in range(2):
        seq = beam.sequences[b]
        n = int((seq != model.config.pad_id).sum()) - 1  # generated tokens, EOS included
        assert beam.scores[b].item() == pytest.approx(_sequence_logprob(model, x[b], seq[:n + 1]) / n, rel=1e-4)
    # One beam with no length penalty is greedy decoding.
    one = model.generate_ids(x, method="beam", num_beams=1, length_penalty=0.0, max_new_tokens=8)
    greedy = model.generate_ids(x, method="greedy", max_new_tokens=8)
    assert torch.equal(one.sequences, greedy.sequences)
    torch.testing.assert_close(one.scores.float(), greedy.scores, rtol=1e-5, atol=1e-5)


def test_nucleus_sampling_is_seeded_and_narrows_to_greedy(tokenizer):
    model = make_model(tokenizer, seed=6)
    x = images(4, seed=6)
    a = model.generate(x, method="nucleus", top_p=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(x, method="nucleus", top_p=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    narrow = model.generate_ids(x, method="nucleus", top_p=1e-9, max_new_tokens=10,
                                generator=torch.Generator().manual_seed(2))
    greedy = model.generate_ids(x, method="greedy", max_new_tokens=10)
    assert torch.equal(narrow.sequences, greedy.sequences)


def test_overfit_model_captions_its_images(tokenizer):
    model = make_model(tokenizer, seed=7).train()
    texts = captions(3, seed=7)
    batch = model.tokenize(texts)
    x = images(3, seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        loss = model(x, batch.ids, batch.lengths)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.generate(x, method="greedy") == texts
    assert model.generate(x, method="beam", num_beams=3) == texts
    scores = model.clip_score(x, texts)
    assert scores.shape == (3,) and (scores <= 100).all()
    mismatched = model.clip_score(x, texts[1:] + texts[:1])
    assert (scores > mismatched).all()
    torch.testing.assert_close(scores, 100 * (model.encode_image(x) * model.encode_text(texts)).sum(-1))


def test_embeddings_are_normalized_and_images_resized(tokenizer):
    model = make_model(tokenizer, seed=8)
    emb = model.encode_image(images(2, seed=8, size=48))
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    wide = torch.rand(1, 3, 40, 72) * 2 - 1
    assert model.prepare_images(wide).shape == (1, 3, 32, 32)
    torch.testing.assert_close(model.encode_text(["a red star"]).norm(dim=-1), torch.ones(1))


def test_save_load_round_trip_and_strict_loading(tokenizer, tmp_path):
    model = make_model(tokenizer, seed=9)
    model.save_pretrained(tmp_path / "coca")
    assert sorted(p.name for p in (tmp_path / "coca").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    loaded = CoCa.from_pretrained(tmp_path / "coca")
    assert loaded.config == model.config and loaded.tokenizer == tokenizer
    x = images(2, seed=9)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.generate(x, method="beam") == model.generate(x, method="beam")

    weights = tmp_path / "coca" / "model.safetensors"
    state = load_file(weights)
    state.pop("text.pos_embed")
    state["extra.weight"] = torch.zeros(1)
    state["multimodal.lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as err:
        CoCa.from_pretrained(tmp_path / "coca")
    message = str(err.value)
    assert "missing: text.pos_embed" in message and "unexpected: extra.weight" in message
    assert "multimodal.lm_head.weight (3, 3)" in message


def test_bad_inputs_are_clear_errors(tokenizer):
    model = make_model(tokenizer)
    x = images(2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.generate(x[:, 0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        model.generate((x * 127 + 128).to(torch.uint8))
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        model.generate(x * 255)
    with pytest.raises(ValueError, match="unknown method 'topk'"):
        model.generate(x, method="topk")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, max_new_tokens=model.config.max_text_len)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(x, method="nucleus", top_p=0.0)
    batch = model.tokenize(captions(3))
    with pytest.raises(ValueError, match="2 images but 3 token rows"):
        model(x, batch.ids, batch.lengths)
    with pytest.raises(ValueError, match="exactly one of"):
        model(x, batch.ids[:2])
    with pytest.raises(ValueError, match="one text per image"):
        model.clip_score(x, ["a red star"])
    with pytest.raises(ValueError, match="limit of 24 tokens"):
        model.tokenize([" ".join(["red star"] * 30)], truncate=False)
    with pytest.raises(ValueError, match="head dim"):
        CoCaConfig(**{**TEST_CONFIG, "vision_heads": 4})
    with pytest.raises(ValueError, match="unknown field"):
        CoCaConfig.from_dict({**TEST_CONFIG, "not_a_field": 1})


def test_presets_are_valid_configs():
    for name in ("tiny", "small", "base", "large"):
        config = CoCaConfig.preset(name)
        assert CoCaConfig.from_dict(config.to_dict()) == config
    assert math.isclose(CoCaConfig.tiny().caption_weight, 2.0) and CoCaConfig.tiny().contrastive_weight == 1.0


FUSED = [b for b in ops.available_backends() if b != "reference"]


@pytest.mark.skipif(not FUSED or FUSED == ["triton"] and not torch.cuda.is_available(),
                    reason="no fused backend is live on CPU tensors in this process")
def test_fused_backend_matches_reference(tokenizer):
    model = make_model(tokenizer, seed=10)
    x = images(2, seed=10)
    batch = model.tokenize(captions(2, seed=10))
    with torch.no_grad():
        with ops.use_backend("reference"):
            ref_loss = model(x, batch.ids, batch.lengths)
            ref_emb = model.encode_image(x)
            ref_ids = model.generate_ids(x, max_new_tokens=8)
        fused_loss = model(x, batch.ids, batch.lengths)
        fused_emb = model.encode_image(x)
        fused_ids = model.generate_ids(x, max_new_tokens=8)
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_emb, ref_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_ids.logits, ref_ids.logits, rtol=1e-4, atol=1e-4)


def _contrastive_rank(rank, world, init_file, result_file):
    import torch.distributed as dist
    import torch.nn.functional as F

    from dalle3_fast.models.captioner.loss import contrastive_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4 * world, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(4 * world, 16, generator=g), dim=-1)
    mine = slice(4 * rank, 4 * (rank + 1))
    local_image, local_text = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
    loss = contrastive_loss(local_image, local_text, torch.tensor(10.0))
    loss.backward()
    save_file({"loss": loss.detach(), "image": local_image.grad, "text": local_text.grad}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_contrastive_loss_spans_the_global_batch_under_ddp(tmp_path):
    """Two gloo ranks: local losses average to the full-batch loss, and the row gradients (which DDP then
    averages through the parameters) equal the full-batch gradient times the world size."""
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    world = 2
    mp.spawn(_contrastive_rank, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world)
    results = [load_file(f"{tmp_path / 'out'}.{r}") for r in range(world)]
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4 * world, 16, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4 * world, 16, generator=g), dim=-1).requires_grad_()
    labels = torch.arange(4 * world)
    full = 0.5 * (F.cross_entropy(10 * image @ text.t(), labels) + F.cross_entropy(10 * text @ image.t(), labels))
    full.backward()
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, full.detach())
    torch.testing.assert_close(torch.cat([r["image"] for r in results]) / world, image.grad)
    torch.testing.assert_close(torch.cat([r["text"] for r in results]) / world, text.grad)
