"""Training reads synthetic captions from a named shard member (what ``python -m dalle3_fast.recaption`` writes)
instead of the world's true captions in the json, and the captioner task shapes new models with model_config."""
import pytest
import torch

from dalle3_fast.data.shards import ShardWriter
from dalle3_fast.data.world import world_sample
from dalle3_fast.train.task import TaskContext
from dalle3_fast.train.tasks import build_task
from dalle3_fast.train.tasks.image_data import ImageDataOptions, image_batches

N = 8


def write_shard(path, recaptioned=range(N)):
    with ShardWriter(path) as w:
        for i in range(N):
            image, rec = world_sample(0, i, 32, 32)
            members = {"png": image, "txt": rec["alt"], "json": rec}
            if i in recaptioned:
                members["dsc"] = f"recaptioned {i}"
            w.write(f"{i:09d}", members)
    return str(path)


def records(data, member):
    options = ImageDataOptions(data=data, resolution=32, synthetic_member=member)
    return next(image_batches(options, N, 0, 1, 0))["records"]


def test_synthetic_member_replaces_the_json_captions(tmp_path):
    shard = write_shard(tmp_path / "000000.tar")
    got = records(shard, "dsc")
    assert sorted(r["dsc"] for r in got) == sorted(f"recaptioned {i}" for i in range(N))
    assert all("ssc" not in r and r["alt"] for r in got)  # no true caption of the world is left


def test_default_keeps_the_json_caption_where_no_member_is(tmp_path):
    shard = write_shard(tmp_path / "000000.tar", recaptioned={0, 1})
    got = {r["key"]: r for r in records(shard, "")}
    assert got["000000000"]["dsc"] == "recaptioned 0"
    assert got["000000005"]["dsc"] == world_sample(0, 5, 32, 32)[1]["dsc"]
    with pytest.raises(ValueError, match=r"has no \.dsc member; recaption the shards first"):
        records(shard, "dsc")
    with pytest.raises(ValueError, match="reads a shard member, but data is \"world\""):
        image_batches(ImageDataOptions(synthetic_member="dsc"), 2, 0, 1, 0)


def _ctx(tmp_path):
    return TaskContext(seed=0, device=torch.device("cpu"), rank=0, world_size=1, activation_checkpointing=False,
                       out_dir=tmp_path, precision="fp32")


def test_unet_task_trains_on_the_member_captions(tmp_path):
    shard = write_shard(tmp_path / "000000.tar")
    task = build_task("unet", {"data": shard, "resolution": 32, "synthetic_member": "dsc", "synthetic_ratio": 1.0,
                               "caption_drop": 0.0}, _ctx(tmp_path))
    batch = next(task.batches(N, 0, 1, 0))
    assert sorted(batch["captions"]) == sorted(f"recaptioned {i}" for i in range(N))


def test_captioner_task_model_config(tmp_path):
    from dalle3_fast.models.captioner.image_encoder import ConvStem

    base = {"resolution": 32, "tokenizer_scenes": 40}
    model = build_task("captioner", base, _ctx(tmp_path)).build_model()
    assert isinstance(model.visual.patch_embed, ConvStem)  # the tiny preset's stem
    model = build_task("captioner", {**base, "model_config": {"image_stem": "patch", "vision_layers": 1}},
                       _ctx(tmp_path)).build_model()
    assert isinstance(model.visual.patch_embed, torch.nn.Conv2d) and len(model.visual.blocks) == 1
    with pytest.raises(ValueError, match="unknown field"):
        build_task("captioner", {**base, "model_config": {"stem": "conv"}}, _ctx(tmp_path)).build_model()
    model.save_pretrained(tmp_path / "cap")
    with pytest.raises(ValueError, match="a fine-tune \\(init_from\\) keeps its model's config"):
        build_task("captioner", {**base, "init_from": str(tmp_path / "cap"), "model_config": {"vision_layers": 2}},
                   _ctx(tmp_path)).build_model()
