"""The assembled pipeline on tiny random-init parts: directory round trip, seeds, batching, stage timings."""
import json

import pytest
import torch

from dalle3_fast.io import CheckpointError
from dalle3_fast.pipeline import Dalle3Pipeline, PipelineError


def tiny_pipeline(with_decoder=True) -> Dalle3Pipeline:
    from dalle3_fast.models.latent_decoder import LatentDecoder, latent_decoder_config
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer
    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.vae import AutoencoderKL, vae_config

    torch.manual_seed(0)
    texts = ["a red circle above a blue square", "two green triangles on a white background",
             "a small yellow star to the left of a large pink cross"] * 10
    text = T5TextEncoder.tiny(SentencePieceTokenizer.train(texts, vocab_size=60), d_model=64, max_tokens=32)
    vae = AutoencoderKL(vae_config("tiny", block_out_channels=(16, 16, 16, 16), norm_num_groups=8))
    decoder = LatentDecoder(latent_decoder_config("tiny", decoder_block_out_channels=(16, 16, 16),
                                                  decoder_norm_num_groups=8)) if with_decoder else None
    return Dalle3Pipeline(text, UNet("tiny"), vae, decoder=decoder, defaults={"steps": 2}).to("cpu")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_round_trip_same_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["unet"] == "unet" and index["decoder"] == "decoder" and index["upsampler"] is None
    again = Dalle3Pipeline.from_pretrained(tmp_path / "p")
    a = pipe("a red circle", seed=5, steps=2)
    b = again("a red circle", seed=5, steps=2)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert a.revised_prompts == ["a red circle"] and a.seeds == [5]


def test_batch_equals_single_calls_and_seeds_differ(pipe):
    both = pipe(["a red circle", "a blue square"], seed=7, steps=2)
    assert both.seeds == [7, 8]
    single = pipe("a blue square", seed=8, steps=2)
    assert torch.allclose(torch.tensor(list(both.images[1].tobytes()), dtype=torch.float),
                          torch.tensor(list(single.images[0].tobytes()), dtype=torch.float), atol=1)
    assert both.images[0].tobytes() != pipe("a red circle", seed=8, steps=2).images[0].tobytes()


def test_timings_and_consistency_decoder(pipe):
    out = pipe("a red circle", seed=0, steps=2, n=2, decoder="consistency", negative_prompt="blue")
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert set(out.timings) >= {"upsample_s", "text_encoder_s", "denoise_s", "decode_s"}
    assert all(v >= 0 for v in out.timings.values())


def test_errors(pipe, tmp_path):
    with pytest.raises(PipelineError, match="multiple of 16"):
        pipe("a star", size="72x64")
    with pytest.raises(PipelineError, match="steps"):
        pipe("a star", steps=0)
    with pytest.raises(PipelineError, match="non-empty"):
        pipe("  ")
    with pytest.raises(PipelineError, match="decoder"):
        tiny_pipeline(with_decoder=False)("a star", decoder="consistency")
    with pytest.raises(CheckpointError, match="does not exist"):
        Dalle3Pipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="longer than the limit"):
        pipe(" ".join(["a red circle"] * 20), truncate=False, steps=1)
    with pytest.warns(UserWarning, match="truncated"):
        pipe(" ".join(["a red circle"] * 20), steps=1)
