"""nn attention, transformer and timestep-embedding layers against diffusers (the oracle), fp32 on CPU."""
import pytest
import torch

from dalle3_fast import ops
from dalle3_fast.nn.attention import Attention, TextContext
from dalle3_fast.nn.embeddings import TimestepEmbedding, Timesteps
from dalle3_fast.nn.transformer import BasicTransformerBlock, SpatialTransformer

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock as DBasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import Attention as DAttention  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding as DTimestepEmbedding  # noqa: E402
from diffusers.models.embeddings import Timesteps as DTimesteps  # noqa: E402
from diffusers import Transformer2DModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(module, std=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.eval()


def copy_into(ours, theirs):
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval()


def keep_mask(lengths, L):
    return torch.arange(L)[None, :] < lengths[:, None]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_self_attention_matches_diffusers():
    ref = randomize(DAttention(query_dim=48, heads=3, dim_head=32))
    ours = copy_into(Attention(48, 3, 32), ref)
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        assert rel(ours(x), ref(x)) < 1e-5


def test_cross_attention_with_lengths_matches_diffusers_mask():
    ref = randomize(DAttention(query_dim=64, cross_attention_dim=24, heads=2, dim_head=32))
    ours = copy_into(Attention(64, 2, 32, cross_attention_dim=24), ref)
    x, text = torch.randn(3, 20, 64), torch.randn(3, 9, 24)
    lengths = torch.tensor([9, 4, 1], dtype=torch.int32)
    bias = (1 - keep_mask(lengths, 9).float()) * -10000.0
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=text, attention_mask=bias[:, None, :])
        got = ours(x, TextContext.from_tokens(text, lengths))
        assert rel(got, expected) < 1e-5


def test_precomputed_kv_gives_the_same_output():
    attn = randomize(Attention(64, 2, 32, cross_attention_dim=24))
    attn.kv_slot = 0
    x, text = torch.randn(2, 11, 64), torch.randn(2, 5, 24)
    ctx = TextContext.from_tokens(text, torch.tensor([5, 2]))
    with torch.no_grad():
        direct = attn(x, ctx)
        cached = attn(x, TextContext(None, ctx.lengths, (attn.project_kv(text),)))
    assert torch.equal(direct, cached)


def test_non_prefix_mask_equals_dropping_the_masked_tokens():
    attn = randomize(Attention(64, 2, 32, cross_attention_dim=16))
    x, text = torch.randn(1, 6, 64), torch.randn(1, 7, 16)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1]])
    with torch.no_grad():
        masked = attn(x, TextContext.from_tokens(text, mask=mask))
        dropped = attn(x, TextContext.from_tokens(text[:, mask[0].bool()]))
    assert rel(masked, dropped) < 1e-6


def test_empty_prompt_attends_to_nothing():
    attn = randomize(Attention(64, 2, 32, cross_attention_dim=16))
    x, text = torch.randn(2, 6, 64), torch.randn(2, 4, 16)
    with torch.no_grad():
        out = attn(x, TextContext.from_tokens(text, torch.tensor([0, 4])))
    assert torch.isfinite(out).all()
    # no keys: the attention output is zero, so only the output projection's bias is left
    torch.testing.assert_close(out[0], attn.to_out[0].bias.expand(6, 64))


def test_text_context_refuses_bad_input():
    text = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="encoder_lengths"):
        TextContext.from_tokens(text, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="encoder_lengths"):
        TextContext.from_tokens(text, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        TextContext.from_tokens(text, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        TextContext.from_tokens(torch.randn(2, 5))
    with pytest.raises(ValueError, match="head dim"):
        Attention(64, 8, 8)


@pytest.mark.parametrize("cross", [True, False])
def test_basic_transformer_block_matches_diffusers(cross):
    cross_dim = 24 if cross else None
    ref = randomize(DBasicTransformerBlock(64, 2, 32, cross_attention_dim=cross_dim))
    ours = copy_into(BasicTransformerBlock(64, 2, 32, cross_attention_dim=cross_dim), ref)
    x, text = torch.randn(2, 13, 64), torch.randn(2, 6, 24)
    lengths = torch.tensor([6, 3])
    with torch.no_grad():
        if cross:
            bias = (1 - keep_mask(lengths, 6).float()) * -10000.0
            expected = ref(x, encoder_hidden_states=text, encoder_attention_mask=bias[:, None])
            got = ours(x, TextContext.from_tokens(text, lengths))
        else:
            expected, got = ref(x), ours(x)
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("linear,depth", [(False, 1), (True, 2)])
def test_spatial_transformer_matches_diffusers_transformer2d(linear, depth):
    ref = randomize(Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=48, num_layers=depth,
                                       cross_attention_dim=24, norm_num_groups=8, use_linear_projection=linear))
    ours = copy_into(SpatialTransformer(2, 32, in_channels=48, num_layers=depth, cross_attention_dim=24,
                                        norm_num_groups=8, use_linear_projection=linear), ref)
    x, text = torch.randn(2, 48, 6, 10), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=text, return_dict=False)[0]
        got = ours(x, TextContext.from_tokens(text))
        got_cl = ours(x.contiguous(memory_format=torch.channels_last), TextContext.from_tokens(text))
    assert rel(got, expected) < 1e-5
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    assert rel(got_cl, expected) < 1e-5


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 33)])
def test_timestep_embeddings_match_diffusers(flip, shift, dim):
    t = torch.tensor([0, 1, 17, 999]).float() + torch.rand(4)
    torch.testing.assert_close(Timesteps(dim, flip, shift)(t), DTimesteps(dim, flip, shift)(t), rtol=0, atol=1e-6)
    ref = randomize(DTimestepEmbedding(dim, 64, cond_proj_dim=8))
    ours = copy_into(TimestepEmbedding(dim, 64, cond_proj_dim=8), ref)
    feats, cond = torch.randn(4, dim), torch.randn(4, 8)
    with torch.no_grad():
        assert rel(ours(feats, cond), ref(feats, cond)) < 1e-6
        assert rel(ours(feats), ref(feats)) < 1e-6


def test_layers_agree_on_every_live_backend():
    block = randomize(SpatialTransformer(2, 32, in_channels=64, num_layers=1, cross_attention_dim=16,
                                         norm_num_groups=8))
    x, text = torch.randn(2, 64, 5, 7), torch.randn(2, 4, 16)
    ctx = TextContext.from_tokens(text, torch.tensor([4, 2]))
    with torch.no_grad(), ops.use_backend("reference"):
        expected = block(x, ctx)
    for backend in ops.available_backends():
        if backend in ("cuda", "triton"):
            continue  # CPU tensors; the GPU backends are compared in the ops tests
        with torch.no_grad(), ops.use_backend(backend):
            assert rel(block(x, ctx), expected) < 1e-5, backend


def test_attention_backward_matches_diffusers():
    ref = DAttention(query_dim=64, cross_attention_dim=16, heads=2, dim_head=32)
    ours = copy_into(Attention(64, 2, 32, cross_attention_dim=16), ref)
    x, text = torch.randn(2, 9, 64), torch.randn(2, 4, 16)
    ref(x, encoder_hidden_states=text).square().sum().backward()
    ours(x, TextContext.from_tokens(text)).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) < 1e-5, name
