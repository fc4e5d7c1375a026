"""ONNX export of the 2-step decoder, the U-Net and the VAE decoder (CLI), checked with onnx.checker and
onnxruntime against PyTorch; the ONNX decoder as the pipeline's decoder; TensorRT where it can run."""
from __future__ import annotations

import json
import random

import onnx
import pytest
import torch

from dalle3_fast.diffusion import decode_consistency
from dalle3_fast.export import ORTDecoder, part_spec
from dalle3_fast.export.__main__ import main as export_main
from dalle3_fast.export.onnx_export import onnx_session, relative_error
from dalle3_fast.export.tensorrt import tensorrt_unavailable_reason

TRT_REASON = tensorrt_unavailable_reason()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A random-init micro pipeline (VAE x2, 2-level U-Net and latent decoder, 16x16 images): export is the cost."""
    from dalle3_fast.models.latent_decoder import LatentDecoder
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer
    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.vae import AutoencoderKL
    from dalle3_fast.pipeline import Dalle3Pipeline

    words = "a the red blue green circle square triangle above below left right of on".split()
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)],
                                             vocab_size=48)
    torch.manual_seed(0)
    vae = AutoencoderKL("tiny", block_out_channels=(16, 32), norm_num_groups=8)
    decoder = LatentDecoder("tiny", encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 16),
                            decoder_norm_num_groups=8)
    unet = UNet("tiny", down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])  # attention on the inner level only
    pipe = Dalle3Pipeline(T5TextEncoder.tiny(tokenizer, d_model=64, num_layers=1, num_heads=2, seed=0),
                          unet, vae, decoder=decoder, defaults={"size": "16x16", "steps": 2},
                          sizes=["16x16", "24x16"])
    directory = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    from dalle3_fast.pipeline import Dalle3Pipeline

    return Dalle3Pipeline.from_pretrained(pipeline_dir)


def export(pipeline_dir, tmp_path_factory, part):
    out = tmp_path_factory.mktemp(part)
    argv = ["--pipeline", str(pipeline_dir), "--part", part, "--onnx", str(out / f"{part}.onnx"),
            "--min-size", "8x8", "--opt-size", "16x16", "--max-size", "32x32", "--max-batch", "4",
            "--json", str(out / "report.json")]
    assert export_main(argv) == 0
    return out / f"{part}.onnx", json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def decoder_onnx(pipeline_dir, tmp_path_factory):
    return export(pipeline_dir, tmp_path_factory, "decoder")


def _check_graph(path, dynamic_inputs):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, "custom-domain nodes would need a plugin"
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    for name, axes in dynamic_inputs.items():
        assert all(isinstance(inputs[name][a], str) for a in axes), (name, inputs[name])
    return inputs


def test_decoder_exports_as_one_dynamic_graph(decoder_onnx, pipe):
    path, report = decoder_onnx
    inputs = _check_graph(path, {"latents": (0, 2, 3), "noise_0": (0, 2, 3), "noise_1": (0, 2, 3)})
    assert list(inputs) == ["latents", "noise_0", "noise_1"]
    assert [r["size"] for r in report["verify"]] == ["16x16", "8x8"]
    assert all(r["rel_err"] < 1e-3 for r in report["verify"])
    # A size and batch the export never saw, against the PyTorch decoder itself (not the graph module).
    session = onnx_session(path)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 12, 8, generator=gen)
    noise = torch.randn(2, 3, 3, 24, 16, generator=gen)
    ref = decode_consistency(pipe.decoder, z, noise=noise)
    out = session.run(None, {"latents": z.numpy(), "noise_0": noise[0].numpy(), "noise_1": noise[1].numpy()})[0]
    assert relative_error(out, ref.numpy()) < 1e-3


def test_onnx_decoder_is_a_drop_in_pipeline_decoder(decoder_onnx, pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe.decode(latents, decoder="consistency", seeds=[3, 4])
    torch_decoder = pipe.decoder
    try:
        pipe.decoder = ORTDecoder(decoder_onnx[0], like=torch_decoder)
        out = pipe.decode(latents, decoder="consistency", seeds=[3, 4])
    finally:
        pipe.decoder = torch_decoder
    assert out.shape == ref.shape == (2, 3, 16, 16)
    assert relative_error(out.numpy(), ref.numpy()) < 1e-3
    with pytest.raises(ValueError, match="2-step"):
        ORTDecoder(decoder_onnx[0], like=torch_decoder).decode(latents, num_inference_steps=1)


def test_unet_exports_with_dynamic_batch_size_and_tokens(pipeline_dir, tmp_path_factory, pipe):
    path, report = export(pipeline_dir, tmp_path_factory, "unet")
    _check_graph(path, {"sample": (0, 2, 3), "timestep": (0,), "encoder_hidden_states": (0, 1),
                        "encoder_lengths": (0,)})
    assert all(r["rel_err"] < 1e-3 for r in report["verify"]) and len(report["verify"]) == 2
    spec = part_spec(pipe, "unet")
    inputs = spec.inputs(3, 24, 16, seed=9, tokens=5)
    with torch.no_grad():
        ref = spec.module(**inputs).numpy()
    out = onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert relative_error(out, ref) < 1e-3


def test_vae_decoder_exports(pipeline_dir, tmp_path_factory):
    path, report = export(pipeline_dir, tmp_path_factory, "vae-decoder")
    _check_graph(path, {"latents": (0, 2, 3)})
    assert all(r["rel_err"] < 1e-3 for r in report["verify"])


def test_decoder_graph_equals_latent_decoder_decode(pipe):
    spec = part_spec(pipe, "decoder")
    inputs = spec.inputs(2, 16, 16, seed=3)
    with torch.no_grad():
        graph = spec.module(**inputs)
    ref = decode_consistency(pipe.decoder, inputs["latents"], noise=[inputs["noise_0"], inputs["noise_1"]])
    torch.testing.assert_close(graph, ref, rtol=1e-5, atol=1e-5)


def test_cli_errors_are_one_line(pipeline_dir, tmp_path, capsys):
    argv = ["--pipeline", str(pipeline_dir), "--part", "decoder", "--onnx", str(tmp_path / "x.onnx")]
    assert export_main(argv + ["--opt-size", "15x16"]) == 1
    assert "--opt-size 15x16 is not a multiple of 4" in capsys.readouterr().err
    assert export_main(argv + ["--min-size", "32x32", "--max-size", "16x16"]) == 1
    assert "--min-size <= --opt-size <= --max-size" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here; the install hint is not printed")
def test_tensorrt_missing_says_how_to_install(pipeline_dir, tmp_path, capsys):
    argv = ["--pipeline", str(pipeline_dir), "--part", "decoder", "--onnx", str(tmp_path / "d.onnx"),
            "--tensorrt", str(tmp_path / "d.plan")]
    assert export_main(argv) == 1
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err or "no CUDA GPU" in err


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_engine_decodes_like_pytorch(pipeline_dir, tmp_path):
    from dalle3_fast.export import TRTDecoder
    from dalle3_fast.pipeline import Dalle3Pipeline

    argv = ["--pipeline", str(pipeline_dir), "--part", "decoder", "--onnx", str(tmp_path / "d.onnx"),
            "--tensorrt", str(tmp_path / "d.plan"), "--min-size", "8x8", "--opt-size", "16x16",
            "--max-size", "32x32", "--max-batch", "4", "--json", str(tmp_path / "r.json")]
    assert export_main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(c["rel_err"] < 1e-3 for c in report["tensorrt"]["checks"])
    pipe = Dalle3Pipeline.from_pretrained(pipeline_dir, device="cuda")
    latents = torch.randn(2, 4, 8, 8, device="cuda")
    ref = pipe.decode(latents, decoder="consistency", seeds=[1, 2])
    pipe.decoder = TRTDecoder(tmp_path / "d.plan", like=pipe.decoder)
    out = pipe.decode(latents, decoder="consistency", seeds=[1, 2])
    assert relative_error(out.cpu().numpy(), ref.cpu().numpy()) < 1e-3
