"""Captioner training end to end through ``python -m dalle3_fast.train``'s CLI with the shipped configs: the
DSC captioner from scratch on the scene world, its SSC fine-tune on a tiny shard set, alt-text pre-training,
and the orchestration script's export of them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _train(config: str, out: Path, steps: int, *overrides: str) -> dict:
    from dalle3_fast.train.__main__ import main

    argv = [str(REPO / "configs" / config), "--out", str(out), "--steps", str(steps), "--no-progress",
            "--set", "batch_size=8", "--set", "log_every=5", "--set", "ckpt_every=0",
            "--set", "optimizer.warmup_steps=3"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    return {"final": out / "final", "losses": [json.loads(line)["loss"] for line in
                                               (out / "metrics.jsonl").read_text().splitlines()]}


def _write_shards(directory: Path, shards: int, per_shard: int) -> str:
    from dalle3_fast.data.world.writer import write_shard

    for s in range(shards):
        write_shard(str(directory), s, s * per_shard, (s + 1) * per_shard, 0, 64, 64, "png")
    return str(directory / f"{{000000..{shards - 1:06d}}}.tar")


def test_dsc_then_ssc_finetune_and_pretrain_through_the_cli(tmp_path, one_thread):
    from dalle3_fast.models.captioner import CoCa

    data = _write_shards(tmp_path / "data", 2, 16)
    first_shard = str(tmp_path / "data" / "000000.tar")

    dsc = _train("captioner_world_dsc.json", tmp_path / "dsc", 20, "task_options.tokenizer_scenes=100",
                 "sample_every=20", "task_options.sample_tokens=6", "optimizer.lr=1e-3")
    assert dsc["losses"][-1] < 0.8 * dsc["losses"][0], dsc["losses"]
    samples = (tmp_path / "dsc" / "samples" / "captions.jsonl").read_text().splitlines()
    assert len(samples) == 4 and all(len(json.loads(s)["reference"].split()) > 10 for s in samples)  # true DSCs
    assert CoCa.from_pretrained(dsc["final"]).config.multimodal_layers == 2
    deepen = _train("captioner_world_deepen.json", tmp_path / "deepen", 5,
                    f"task_options.init_from={json.dumps(str(dsc['final']))}", "sample_every=0")
    trained = CoCa.from_pretrained(deepen["final"])
    assert trained.config.image_stem == "conv" and trained.config.caption_grid
    assert trained.config.multimodal_layers == 4

    ssc = _train("captioner_world_ssc.json", tmp_path / "ssc", 10, f"task_options.data={json.dumps(first_shard)}",
                 f"task_options.init_from={json.dumps(str(deepen['final']))}", "sample_every=0")
    assert ssc["losses"][-1] < ssc["losses"][0], ssc["losses"]
    finetuned = CoCa.from_pretrained(ssc["final"])
    assert finetuned.config == trained.config and finetuned.tokenizer is not None
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), finetuned.state_dict().values()))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert isinstance(finetuned.generate(image, max_new_tokens=5)[0], str)

    pre = _train("captioner_world_pretrain.json", tmp_path / "pretrain", 5, f"task_options.data={json.dumps(data)}",
                 "task_options.tokenizer_scenes=100", "sample_every=0")
    assert not CoCa.from_pretrained(pre["final"]).config.caption_grid  # the alt-text baseline keeps the pooler only

    # the orchestration script's export stage reads the same run layout
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_captioners
    finally:
        sys.path.pop(0)
    assert train_captioners.main(["--work", str(tmp_path), "--stages", "export", "--asset", str(tmp_path / "asset"),
                                  "--ssc-asset", str(tmp_path / "ssc_asset")]) == 0
    for name in ("pretrained", "ssc", "dsc"):
        assert CoCa.from_pretrained(tmp_path / "export" / name).tokenizer is not None
    for source, asset in ((trained, "asset"), (finetuned, "ssc_asset")):
        half = CoCa.from_pretrained(tmp_path / asset)
        assert half.dtype == torch.float32
        for (name, a), b in zip(source.state_dict().items(), half.state_dict().values()):
            torch.testing.assert_close(b, a.half().float(), msg=name)


def test_export_names_the_missing_stage(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_captioners
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="no dsc captioner at .*deepen.*; run the deepen stage first"):
        train_captioners.main(["--work", str(tmp_path), "--stages", "export"])
    with pytest.raises(SystemExit, match="no captioner at .*deepen.* to fine-tune; run the deepen stage first"):
        train_captioners.main(["--work", str(tmp_path), "--stages", "ssc"])
    with pytest.raises(SystemExit, match="no captioner at .*dsc.* to fine-tune; run the dsc stage first"):
        train_captioners.main(["--work", str(tmp_path), "--stages", "deepen"])


def test_caption_word_weights_reach_the_loss(tmp_path, one_thread):
    from dalle3_fast.train.task import TaskContext
    from dalle3_fast.train.tasks import build_task

    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=tmp_path, precision="fp32")
    options = json.loads((REPO / "configs" / "captioner_world_dsc.json").read_text())["task_options"]
    options = {**options, "tokenizer_scenes": 100}
    task = build_task("captioner", {**options, "caption_word_weights": {"left": 5, "above": 3}}, ctx)
    model = task.build_model()
    w = task._token_weights
    left, above = (int(task.tokenizer.encode([word], add_eos=False).ids[0, 0]) for word in ("left", "above"))
    assert w[left] == 5 and w[above] == 3 and int((w != 1).sum()) == 2
    batch = next(task.batches(4, 0, 1, 0))
    with torch.no_grad():
        weighted = task.loss(model, batch)[0]
        task._token_weights = None
        assert task.loss(model, batch)[0] != weighted

    unknown = build_task("captioner", {**options, "caption_word_weights": {"zzxqj": 2}}, ctx)
    with pytest.raises(ValueError, match="caption_word_weights.*zzxqj"):
        unknown.build_model()


def test_multimodal_layers_deepens_a_finetuned_captioner(tmp_path, one_thread):
    from dalle3_fast.models.captioner import CoCa, CoCaConfig
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer
    from dalle3_fast.train.task import TaskContext
    from dalle3_fast.train.tasks import build_task

    tok = SentencePieceTokenizer.train(["a red circle above a blue square"] * 50 + ["two green stars"] * 50,
                                       vocab_size=40)
    small = CoCa.from_tokenizer(tok, CoCaConfig.preset("tiny", image_size=64).replace(multimodal_layers=1))
    small.save_pretrained(tmp_path / "small")
    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=tmp_path / "run", precision="fp32")
    task = build_task("captioner", {"init_from": str(tmp_path / "small"), "multimodal_layers": 3,
                                    "caption_key": "dsc"}, ctx)
    assert task.build_model().config.multimodal_layers == 3
    with pytest.raises(ValueError, match="init_from"):
        build_task("captioner", {"multimodal_layers": 3}, ctx).build_model()


def test_grounding_loss_targets_each_named_group_and_exports_a_plain_captioner(tmp_path, one_thread):
    from dalle3_fast.data.world import SceneGraph
    from dalle3_fast.data.world.captions import group_mentions, noun
    from dalle3_fast.models.captioner import CoCa
    from dalle3_fast.train.task import TaskContext
    from dalle3_fast.train.tasks import build_task
    from dalle3_fast.train.tasks.image_data import image_batches

    ctx = TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                      out_dir=tmp_path, precision="fp32")
    options = json.loads((REPO / "configs" / "captioner_world_dsc.json").read_text())["task_options"]
    task = build_task("captioner", {**options, "tokenizer_scenes": 100, "grounding_weight": 0.5}, ctx)
    model = task.build_model()
    batch = next(task.batches(6, 0, 1, 0))
    records = next(image_batches(task.options, 6, 0, 1, 0, 8))["records"]
    mask, xy = batch["ground_mask"], batch["ground_xy"]
    assert mask.shape == (6, batch["ids"].shape[1] - 1) and mask.any(dim=1).all()  # every world DSC names a group
    for i, record in enumerate(records):
        graph = SceneGraph.from_dict(record["graph"])
        centres, names = {}, {}
        for g in graph.groups():
            members = [o for o in graph.objects if o.key() == g.key]
            centres[g.key] = (sum(o.cx for o in members) / len(members) / 32 - 1,
                              sum(o.cy for o in members) / len(members) / 32 - 1)
            names[g.key] = f"{g.key.size} {g.key.colour} {noun(g.key.shape, g.count)}"
        positions = mask[i].nonzero().flatten().tolist()
        assert len(positions) == len(group_mentions(record["dsc"], graph)) > 0
        for t in positions:
            read = task.tokenizer.decode([batch["ids"][i, 1: t + 1].tolist()])[0]  # what position t has read
            key = next(k for k, name in names.items() if read.endswith(name))
            assert torch.allclose(xy[i, t], torch.tensor(centres[key]), atol=1e-5)
    loss, logs = task.loss(model, batch)
    assert logs["ground"] > 0
    loss.backward()
    assert model.grounding_head.weight.grad.abs().sum() > 0
    task.export(model, tmp_path / "export")
    loaded = CoCa.from_pretrained(tmp_path / "export")  # a plain captioner: no grounding head saved
    assert not any("grounding" in k for k in loaded.state_dict())

    no_graph = [{k: v for k, v in r.items() if k != "graph"} for r in records]
    with pytest.raises(ValueError, match="grounding_weight needs a scene graph"):
        task._grounding_targets(no_graph, [r["dsc"] for r in records], batch["ids"].shape[1])
