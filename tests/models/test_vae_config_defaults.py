"""A VAE config.json that leaves fields out loads as diffusers' AutoencoderKL reads it (its defaults)."""
import json

import pytest
import torch

from dalle3_fast.models.vae import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")

LEFT_OUT = [
    {"norm_num_groups": 16},                                              # every architecture field left out
    {"block_out_channels": [32, 64], "norm_num_groups": 16,
     "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},  # layers_per_block
    {"layers_per_block": 2, "norm_num_groups": 16},                       # block_out_channels, sample_size
]


@pytest.mark.parametrize("written", LEFT_OUT)
def test_left_out_fields_take_diffusers_defaults(tmp_path, written):
    config = {"_class_name": "AutoencoderKL", **written}
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL.from_config(config).eval()
    theirs.save_pretrained(tmp_path / "vae", safe_serialization=True)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))  # only the fields written above

    ours = AutoencoderKL.from_pretrained(tmp_path / "vae")
    for name in ("block_out_channels", "layers_per_block", "sample_size", "latent_channels", "scaling_factor",
                 "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        assert getattr(ours.config, name) == (tuple(theirs.config[name]) if name == "block_out_channels"
                                              else theirs.config[name]), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_state) == sorted(theirs_state)
    for k, v in theirs_state.items():
        assert torch.equal(ours_state[k], v), k


def test_dataclass_defaults_are_diffusers_signature_defaults():
    import inspect

    signature = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    for field, value in AutoencoderKLConfig().to_dict().items():
        if field in signature and field not in ("down_block_types", "up_block_types"):
            default = signature[field].default
            assert value == (list(default) if isinstance(default, tuple) else default), field
