"""Every loader refuses a damaged model directory with one CheckpointError (exit 2 in every CLI).

Damage: a missing, an unexpected or a mis-shaped tensor; a truncated, corrupt or empty weights file;
pickled weights only (never unpickled); missing or corrupt tokenizer files.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle3_fast.assets import TINY_PIPELINE
from dalle3_fast.io import CheckpointError
from dalle3_fast.models.text_encoder import T5TextEncoder

pytestmark = pytest.mark.skipif(not (TINY_PIPELINE / "model_index.json").is_file(),
                                reason="the embedded pipeline is not built (scripts/build_tiny_pipeline.py)")


def _drop_first(state):
    state.pop(sorted(k for k in state if k != "shared.weight")[0])


def _add_extra(state):
    state["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(4, 4)


def _reshape(state):
    name = sorted(k for k in state if k.endswith(".q.weight"))[0]
    state[name] = state[name][:-1].clone()


TENSOR_DAMAGE = {"missing": (_drop_first, "missing: "), "unexpected": (_add_extra, "unexpected: encoder.block.9"),
                 "mis-shaped": (_reshape, "mis-shaped: ")}
FILE_DAMAGE = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"",
               "corrupt": lambda b: b[:8] + b"{garbage" + b[16:]}


@pytest.fixture
def pipe_dir(tmp_path):
    d = tmp_path / "pipe"
    shutil.copytree(TINY_PIPELINE, d)
    return d


def damage_tensors(path, how):
    state = load_file(str(path))
    TENSOR_DAMAGE[how][0](state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("part", ["text_encoder", "upsampler"])
@pytest.mark.parametrize("how", sorted(TENSOR_DAMAGE))
def test_t5_parts_refuse_bad_tensors(pipe_dir, part, how):
    from dalle3_fast.upsample import LocalUpsampler

    damage_tensors(pipe_dir / part / "model.safetensors", how)
    load = T5TextEncoder.from_pretrained if part == "text_encoder" else LocalUpsampler.from_pretrained
    with pytest.raises(CheckpointError) as err:
        load(pipe_dir / part)
    needle = TENSOR_DAMAGE[how][1]
    assert needle in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("part,weights", [("text_encoder", "model.safetensors"), ("upsampler", "model.safetensors"),
                                          ("unet", "diffusion_pytorch_model.safetensors"),
                                          ("vae", "diffusion_pytorch_model.safetensors"),
                                          ("decoder", "diffusion_pytorch_model.safetensors")])
@pytest.mark.parametrize("how", sorted(FILE_DAMAGE))
def test_pipeline_refuses_unreadable_weights(pipe_dir, part, weights, how):
    from dalle3_fast.pipeline import Dalle3Pipeline

    path = pipe_dir / part / weights
    path.write_bytes(FILE_DAMAGE[how](path.read_bytes()))
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        Dalle3Pipeline.from_pretrained(pipe_dir)


@pytest.mark.parametrize("part", ["text_encoder", "upsampler"])
def test_pickled_weights_only_are_refused_not_unpickled(pipe_dir, part, monkeypatch):
    from dalle3_fast.pipeline import Dalle3Pipeline

    weights = pipe_dir / part / "model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    torch.save(state, pipe_dir / part / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called: weights were unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        Dalle3Pipeline.from_pretrained(pipe_dir)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_tokenizer_files(pipe_dir, damage):
    from dalle3_fast.pipeline import Dalle3Pipeline

    spm = pipe_dir / "text_encoder" / "tokenizer" / "spiece.model"
    spm.unlink() if damage == "missing" else spm.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="spiece.model"):
        Dalle3Pipeline.from_pretrained(pipe_dir)


def test_unreadable_config(pipe_dir):
    from dalle3_fast.pipeline import Dalle3Pipeline

    (pipe_dir / "text_encoder" / "config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match="config.json"):
        Dalle3Pipeline.from_pretrained(pipe_dir)
    (pipe_dir / "text_encoder" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json"):
        Dalle3Pipeline.from_pretrained(pipe_dir)


def test_t5_checkpoints_with_tied_or_decoder_tensors_load(tmp_path):
    """Both names of the tied embedding, or a whole T5ForConditionalGeneration checkpoint, are not damage."""
    from transformers import T5ForConditionalGeneration

    reference = T5TextEncoder.from_pretrained(TINY_PIPELINE / "text_encoder")
    prompts = ["a red circle above a blue square", "two stars"]
    expected = reference.encode(prompts)

    both = tmp_path / "both"
    shutil.copytree(TINY_PIPELINE / "text_encoder", both)
    state = load_file(str(both / "model.safetensors"))
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    save_file(state, str(both / "model.safetensors"))
    torch.testing.assert_close(T5TextEncoder.from_pretrained(both).encode(prompts), expected, rtol=0, atol=0)
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
    save_file(state, str(both / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tied"):
        T5TextEncoder.from_pretrained(both)

    full = tmp_path / "full"
    shutil.copytree(TINY_PIPELINE / "text_encoder", full)
    config = reference.model.config.to_dict()
    seq2seq = T5ForConditionalGeneration(type(reference.model.config).from_dict({**config, "is_encoder_decoder": True}))
    seq2seq.encoder.load_state_dict(reference.model.encoder.state_dict())
    seq2seq.shared.weight.data.copy_(reference.model.shared.weight)
    seq2seq.save_pretrained(str(full))
    torch.testing.assert_close(T5TextEncoder.from_pretrained(full).encode(prompts), expected, rtol=0, atol=0)
    state = load_file(str(full / "model.safetensors"))
    state.pop(sorted(k for k in state if k.startswith("decoder.block"))[0])
    save_file(state, str(full / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: decoder."):
        T5TextEncoder.from_pretrained(full)


def test_loaded_text_encoder_keeps_its_weights_tied():
    encoder = T5TextEncoder.from_pretrained(TINY_PIPELINE / "text_encoder")
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    assert not any(p.is_meta for p in encoder.model.parameters())


def one_line_error(rc, stderr, *needles):
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_sample_cli_missing_tensor_is_exit_2(pipe_dir, tmp_path):
    damage_tensors(pipe_dir / "text_encoder" / "model.safetensors", "missing")
    proc = subprocess.run([sys.executable, "-m", "dalle3_fast.sample", "--prompt", "a star", "--pipeline",
                           str(pipe_dir), "--steps", "1", "--out", str(tmp_path / "a.png")],
                          capture_output=True, text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr, "missing: encoder.")
    assert not (tmp_path / "a.png").exists()


def test_serve_startup_refuses_a_truncated_text_encoder(pipe_dir):
    weights = pipe_dir / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "dalle3_fast.serve", "--pipeline", str(pipe_dir), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr, "model.safetensors")


@pytest.mark.parametrize("cli", ["upsample", "export", "eval"])
def test_other_clis_exit_2(pipe_dir, tmp_path, cli, capsys):
    import importlib

    damage_tensors(pipe_dir / "upsampler" / "model.safetensors", "mis-shaped")
    damage_tensors(pipe_dir / "text_encoder" / "model.safetensors", "mis-shaped")
    argv = {"upsample": ["--prompt", "a star", "--pipeline", str(pipe_dir)],
            "export": ["--pipeline", str(pipe_dir), "--part", "decoder", "--onnx", str(tmp_path / "d.onnx")],
            "eval": ["--pipeline", str(pipe_dir), "--world-prompts", "1"]}[cli]
    main = importlib.import_module(f"dalle3_fast.{cli}" if cli == "upsample" else f"dalle3_fast.{cli}.__main__").main
    rc = main(argv)
    one_line_error(rc, capsys.readouterr().err, "mis-shaped")


def test_captioner_refuses_damage(tmp_path):
    from dalle3_fast.recaption import DEFAULT_CAPTIONERS, load_captioner

    d = tmp_path / "cap"
    shutil.copytree(DEFAULT_CAPTIONERS["dsc"], d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_captioner(d, torch.device("cpu"))
    shutil.rmtree(d)
    shutil.copytree(DEFAULT_CAPTIONERS["dsc"], d)
    (d / "tokenizer" / "spiece.model").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="spiece.model"):
        load_captioner(d, torch.device("cpu"))


def test_open_clip_scorer_refuses_pickled_checkpoints(tmp_path, monkeypatch):
    from dalle3_fast.eval.clip_score import load_scorer

    checkpoint = tmp_path / "clip.pt"
    torch.save({"w": torch.zeros(1)}, checkpoint)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match="never loaded"):
        load_scorer(f"open_clip:ViT-B-32:{checkpoint}")


def test_sharded_t5_weights_load_through_their_index(tmp_path):
    d = tmp_path / "te"
    shutil.copytree(TINY_PIPELINE / "text_encoder", d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompts = ["a red circle above a blue square"]
    expected = T5TextEncoder.from_pretrained(TINY_PIPELINE / "text_encoder").encode(prompts)
    torch.testing.assert_close(T5TextEncoder.from_pretrained(d).encode(prompts), expected, rtol=0, atol=0)
    weight_map[names[0]] = "model-00002-of-00002.safetensors"  # the index and the shards disagree
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="does not place there"):
        T5TextEncoder.from_pretrained(d)
