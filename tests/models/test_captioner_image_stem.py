"""The captioner's image stems: the conv stem against a plain-PyTorch reference (float64, forward and
backward), training and files with it, and configs written without the newer keys staying patch ViTs."""
import json

import pytest
import torch
import torch.nn.functional as F

from dalle3_fast import ops
from dalle3_fast.models.captioner import CoCa, CoCaConfig
from dalle3_fast.models.captioner.image_encoder import ConvStem
from dalle3_fast.models.tokenizer import SentencePieceTokenizer

SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=1, vision_heads=2, pooler_heads=2,
             caption_queries=8, max_text_len=24, text_width=64, text_heads=2, text_layers=1, multimodal_layers=1,
             embed_dim=32)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"a {c} {s} above a {d} {t}" for c in ("red", "blue", "green") for s in ("circle", "star", "square")
             for d in ("red", "yellow") for t in ("cross", "triangle")]
    return SentencePieceTokenizer.train(texts * 5, vocab_size=48)


def reference_stem(stem: ConvStem, x):
    for layer in stem.layers:
        x = F.conv2d(x, layer.conv.weight, stride=layer.conv.stride, padding=1)
        x = F.silu(F.group_norm(x, layer.norm.num_groups, layer.norm.weight, layer.norm.bias, layer.norm.eps))
    return F.conv2d(x, stem.proj.weight, stem.proj.bias)


@pytest.mark.parametrize("backend", ["reference", *[b for b in ops.available_backends() if b == "cpu"]])
@pytest.mark.parametrize("patch_size,image_size,width,depth", [(8, 40, 64, 1), (4, 28, 96, 1), (2, 10, 32, 1),
                                                               (8, 24, 64, 2), (4, 12, 32, 3)])
def test_conv_stem_matches_plain_pytorch_forward_and_backward(backend, patch_size, image_size, width, depth):
    torch.manual_seed(patch_size + depth)
    config = CoCaConfig(**{**SMALL, "image_stem": "conv", "patch_size": patch_size, "image_size": image_size,
                           "vision_width": width, "vision_heads": width // 32, "pooler_heads": width // 32,
                           "conv_stem_depth": depth})
    stem = ConvStem(config).double()
    stages = patch_size.bit_length() - 1
    assert [layer.conv.stride[0] for layer in stem.layers] == ([2] + [1] * (depth - 1)) * stages
    for p in stem.parameters():  # GroupNorm's affine starts at (1, 0): make it count
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 3, image_size, image_size, dtype=torch.float64, requires_grad=True)
    with ops.use_backend(backend):
        out = stem(x)
    ref = reference_stem(stem, x)
    grid = image_size // patch_size
    assert out.shape == (3, width, grid, grid) == ref.shape
    assert (out - ref).norm() / ref.norm() < 1e-10
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *stem.parameters()], g)
    want = torch.autograd.grad(ref, [x, *stem.parameters()], g)
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm() < 1e-10


@pytest.mark.parametrize("extra", [{}, {"conv_stem_depth": 2, "caption_grid": True}])
def test_conv_stem_captioner_trains_every_parameter_and_round_trips(tokenizer, tmp_path, extra):
    torch.manual_seed(0)
    model = CoCa.from_tokenizer(tokenizer, CoCaConfig(**SMALL, image_stem="conv", **extra)).train()
    batch = model.tokenize(["a red circle above a red cross", "a blue star above a yellow triangle"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model(x, batch.ids, batch.lengths)["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert any(n.startswith("visual.patch_embed.layers.") for n, _ in model.named_parameters())
    model.eval().save_pretrained(tmp_path / "coca")
    assert json.loads((tmp_path / "coca" / "config.json").read_text())["image_stem"] == "conv"
    loaded = CoCa.from_pretrained(tmp_path / "coca")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), rtol=0, atol=0)
    assert loaded.generate(x, max_new_tokens=5) == model.generate(x, max_new_tokens=5)


def test_caption_grid_gives_the_decoder_the_pooled_queries_then_every_grid_token(tokenizer):
    torch.manual_seed(1)
    config = CoCaConfig(**SMALL, image_stem="conv", caption_grid=True)
    model = CoCa.from_tokenizer(tokenizer, config).eval()
    for p in model.visual.ln_post.parameters():  # the final LayerNorm's affine starts at (1, 0): make it count
        torch.nn.init.normal_(p, std=0.5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    v = model.visual
    with torch.no_grad():
        embedding, tokens = v(x)
        grid = v.ln_pre(v.patch_embed(x).flatten(2).transpose(1, 2) + v.pos_embed)
        for block in v.blocks:
            grid = block(grid)
        pooled = v.pooler(grid)
        want = F.layer_norm(torch.cat([pooled, grid], 1), (config.vision_width,), v.ln_post.weight, v.ln_post.bias,
                            config.layer_norm_eps)
    assert tokens.shape == (2, config.caption_queries + config.num_patches, config.vision_width)
    torch.testing.assert_close(tokens, want[:, 1:])
    torch.testing.assert_close(embedding, v.proj(want[:, 0]))
    plain = CoCa.from_tokenizer(tokenizer, config.replace(caption_grid=False)).eval()
    assert plain.visual(x)[1].shape == (2, config.caption_queries, config.vision_width)


def test_a_config_without_the_new_keys_is_the_patch_vit_it_was_written_as(tokenizer, tmp_path):
    """Captioners saved before image_stem / conv_stem_depth / caption_grid existed (the first shipped
    captioner) load strictly as the patch ViT with pooled captioning tokens they were."""
    torch.manual_seed(2)
    written = CoCa.from_tokenizer(tokenizer, CoCaConfig(**SMALL)).eval()
    written.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    for key in ("image_stem", "conv_stem_depth", "caption_grid"):
        del saved[key]
    config_file.write_text(json.dumps(saved))
    model = CoCa.from_pretrained(tmp_path / "old")  # strict: every stored tensor is used, none is missing
    stem = model.visual.patch_embed
    assert (model.config.image_stem, model.config.conv_stem_depth, model.config.caption_grid) == ("patch", 1, False)
    assert isinstance(stem, torch.nn.Conv2d) and stem.kernel_size == stem.stride == (8, 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = F.conv2d(x, stem.weight, stem.bias, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(stem(x).flatten(2).transpose(1, 2), tokens)
    assert model.visual(x)[1].shape == (2, SMALL["caption_queries"], SMALL["vision_width"])
    torch.testing.assert_close(model.encode_image(x), written.encode_image(x), rtol=0, atol=0)


def test_stem_presets_and_errors():
    assert CoCaConfig.tiny().image_stem == "conv" and CoCaConfig.small().image_stem == "conv"
    assert CoCaConfig.base().image_stem == "patch" and CoCaConfig.large().image_stem == "patch"  # open_clip layouts
    assert CoCaConfig().image_stem == "patch"
    for name in ("tiny", "small"):
        config = CoCaConfig.preset(name)
        assert CoCaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="`image_stem`='hybrid'; choose one of patch, conv"):
        CoCaConfig(**SMALL, image_stem="hybrid")
    with pytest.raises(ValueError, match="power of two"):
        CoCaConfig(**{**SMALL, "image_size": 48, "image_stem": "conv", "patch_size": 6})
    with pytest.raises(ValueError, match="`conv_stem_depth` must be a positive int"):
        CoCaConfig(**SMALL, image_stem="conv", conv_stem_depth=0)
    with pytest.raises(ValueError, match="`caption_grid` must be true or false"):
        CoCaConfig(**SMALL, caption_grid="yes")
    with pytest.raises(ValueError, match="exceed the 512 keys"):
        CoCaConfig(**{**SMALL, "image_size": 64, "patch_size": 4, "caption_queries": 300, "caption_grid": True})
    with pytest.raises(ValueError, match="multiple of 8"):
        CoCaConfig(**{**SMALL, "vision_width": 96, "vision_heads": 3, "pooler_heads": 3, "patch_size": 16,
                      "image_size": 32, "image_stem": "conv"})
