"""--unet-engine: the shipped tiny U-Net exported to ONNX with the package's exporter runs every denoising step
(onnxruntime on CPU; TensorRT where it imports), with the PyTorch path's latents and images; a missing, corrupt
or foreign engine file is one error line and exit status 2 in sample, serve and eval."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from dalle3_fast.assets import TINY_PIPELINE
from dalle3_fast.export.__main__ import main as export_main
from dalle3_fast.export.engine_unet import ORTUNet, load_unet_engine, use_unet_engine
from dalle3_fast.export.tensorrt import tensorrt_unavailable_reason
from dalle3_fast.pipeline import Dalle3Pipeline

TRT_REASON = tensorrt_unavailable_reason()
PROMPTS = ["a red circle above a blue square", "a green triangle"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet_engine") / "unet.onnx"
    assert export_main(["--part", "unet", "--onnx", str(path), "--max-batch", "8", "--min-size", "32x32",
                        "--max-size", "128x128", "--no-verify"]) == 0
    return path


@pytest.fixture(scope="module")
def pipe():
    return Dalle3Pipeline.from_pretrained(TINY_PIPELINE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_engine_step_equals_unet_step(unet_onnx, pipe):
    engine = ORTUNet(unet_onnx, like=pipe.unet)
    g = torch.Generator().manual_seed(3)
    x, tokens = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 7, pipe.unet.text_dim, generator=g)
    lengths, t = torch.tensor([7, 1, 4, 0], dtype=torch.int32), torch.tensor([999.0, 500.0, 10.5, 0.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, tokens, encoder_lengths=lengths)
    out = engine(x, t, tokens, lengths)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-4


def test_engine_latents_equal_pytorch_latents(unet_onnx, pipe):
    kw = dict(width=64, height=64, steps=6, guidance=5.0, seeds=[11, 12])
    ref = pipe.generate_latents(PROMPTS, **kw)
    engine_pipe = Dalle3Pipeline.from_pretrained(TINY_PIPELINE)
    use_unet_engine(engine_pipe, unet_onnx)
    calls = []
    run = engine_pipe.unet_engine.run
    engine_pipe.unet_engine.run = lambda feeds: calls.append(feeds["sample"].shape) or run(feeds)
    out = engine_pipe.generate_latents(PROMPTS, **kw)
    assert calls and all(s[0] == 2 * len(PROMPTS) for s in calls)  # the engine ran the CFG-batched steps
    assert rel_err(out, ref) < 1e-4


def test_sample_cli_with_and_without_unet_engine(unet_onnx, tmp_path, capsys):
    from dalle3_fast.sample import main as sample_main

    argv = ["--prompt", PROMPTS[0], "--steps", "4", "--seed", "5"]
    assert sample_main(argv + ["--out", str(tmp_path / "torch.png")]) == 0
    assert sample_main(argv + ["--out", str(tmp_path / "engine.png"), "--unet-engine", str(unet_onnx)]) == 0
    a = np.asarray(Image.open(tmp_path / "torch.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "engine.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2  # uint8 rounding of nearly equal pixels


def _foreign_onnx(path):
    """A valid ONNX model that is not a U-Net export (the decoder's input names)."""
    x = helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["b", 4, "h", "w"])
    y = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 4, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["latents"], ["images"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def bad_engines(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, text the error line must contain)."""
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not an onnx model\xff" * 8)
    bad_plan = tmp_path / "bad.plan"
    bad_plan.write_bytes(b"garbage")
    unknown = tmp_path / "unet.bin"
    unknown.write_bytes(b"x")
    return {"missing": (str(tmp_path / "nope.onnx"), "no such file"),
            "corrupt": (str(corrupt), "not an ONNX model"),
            "foreign": (str(_foreign_onnx(tmp_path / "decoder.onnx")), "not an export of this pipeline's U-Net"),
            "unknown suffix": (str(unknown), "unknown engine type"),
            "plan": (str(bad_plan), "TensorRT" if TRT_REASON else "not a TensorRT engine")}


def test_load_unet_engine_errors_are_one_line(tmp_path, pipe):
    for name, (path, text) in bad_engines(tmp_path).items():
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_unet_engine(path, like=pipe.unet)
        message = str(info.value)
        assert "\n" not in message and message.startswith("--unet-engine") and text in message, (name, message)


def _assert_exit_2_one_line(code, capsys, text):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err and text in err, err


@pytest.mark.parametrize("name", ["missing", "corrupt", "foreign", "unknown suffix", "plan"])
def test_clis_refuse_bad_engine_with_exit_2(name, tmp_path, capsys):
    from dalle3_fast.eval.__main__ import main as eval_main
    from dalle3_fast.sample import main as sample_main
    from dalle3_fast.serve.__main__ import main as serve_main

    path, text = bad_engines(tmp_path)[name]
    _assert_exit_2_one_line(sample_main(["--prompt", "a red circle", "--unet-engine", path,
                                         "--out", str(tmp_path / "x.png")]), capsys, text)
    assert not (tmp_path / "x.png").exists()
    _assert_exit_2_one_line(serve_main(["--unet-engine", path]), capsys, text)
    _assert_exit_2_one_line(eval_main(["--world-prompts", "1", "--unet-engine", path, "--no-progress"]), capsys, text)


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_unet_engine_samples_like_pytorch(tmp_path):
    argv = ["--part", "unet", "--onnx", str(tmp_path / "u.onnx"), "--tensorrt", str(tmp_path / "u.plan"),
            "--min-size", "32x32", "--opt-size", "64x64", "--max-size", "128x128", "--max-batch", "8"]
    assert export_main(argv) == 0
    pipe = Dalle3Pipeline.from_pretrained(TINY_PIPELINE, device="cuda")
    kw = dict(width=64, height=64, steps=4, guidance=5.0, seeds=[1, 2])
    ref = pipe.generate_latents(PROMPTS, **kw)
    use_unet_engine(pipe, tmp_path / "u.plan")
    out = pipe.generate_latents(PROMPTS, **kw)
    assert rel_err(out.cpu(), ref.cpu()) < 1e-3
