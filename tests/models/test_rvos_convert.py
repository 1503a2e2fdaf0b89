"""rvos converter: ModelScope MTTR keys -> ours, strictly."""

from __future__ import annotations

import re

import pytest
import torch

from vbatch.models.checkpoint import CheckpointError, check_state_dict, load_checkpoint
from vbatch.models.rvos import TINY
from vbatch.models.rvos.convert import from_modelscope, modelscope_state_dict, to_modelscope
from vbatch.models.rvos.model import MTTR

# key families of ModelScope's MTTR (utils/mttr.py and friends), one example each
MODELSCOPE_EXAMPLES = (
    "backbone.patch_embed.proj.weight",
    "backbone.layers.0.blocks.1.attn.relative_position_bias_table",
    "backbone.layers.2.blocks.0.mlp.fc2.bias",
    "backbone.downsamples.1.reduction.weight",
    "transformer.encoder.layers.0.self_attn.in_proj_weight",
    "transformer.decoder.layers.1.multihead_attn.out_proj.weight",
    "transformer.decoder.norm.weight",
    "transformer.text_encoder.encoder.layer.1.attention.self.query.weight",
    "transformer.txt_proj.layer_norm.bias",
    "vid_embed_proj.weight",
    "obj_queries.weight",
    "is_referred_head.bias",
    "instance_kernels_head.layers.1.weight",
    "spatial_decoder.gn4.weight",
    "spatial_decoder.adapter2.bias",
    "spatial_decoder.out_lay.weight",
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MTTR(TINY).eval()


@pytest.fixture(scope="module")
def ms_sd(model):
    return modelscope_state_dict(model)


def test_modelscope_keys_look_like_the_reference(ms_sd):
    for key in MODELSCOPE_EXAMPLES:
        assert key in ms_sd, key
    assert "transformer.text_encoder.embeddings.position_ids" in ms_sd
    assert "backbone.layers.0.blocks.0.attn.relative_position_index" in ms_sd
    assert not any(k.startswith("transformer.text_encoder.pooler") for k in ms_sd)  # pooler=None


def test_every_key_consumed(model, ms_sd):
    ours = from_modelscope(ms_sd)
    check_state_dict(model, ours, "synthetic")  # no missing, unexpected or mis-shaped key
    assert set(ours) == set(model.state_dict())
    dropped = set(ms_sd) - set(to_modelscope(ours))
    assert all(
        re.search(r"attn\.relative_position_index$", k) or k.endswith("embeddings.position_ids")
        for k in dropped
    )
    n_blocks = sum(TINY.swin.depths)
    assert len(dropped) == n_blocks + 1
    for k, v in ours.items():
        assert torch.equal(v, model.state_dict()[k])


def test_position_ids_optional(model, ms_sd):
    sd = {k: v for k, v in ms_sd.items() if not k.endswith("position_ids")}
    check_state_dict(model, from_modelscope(sd), "without position_ids")


def _save(tmp_path, sd, wrap=True):
    path = tmp_path / "pytorch_model.pt"
    torch.save({"model_state_dict": sd} if wrap else sd, path)
    return path


@pytest.mark.parametrize("wrap", [True, False])
def test_strict_load_roundtrip(tmp_path, model, ms_sd, wrap):
    fresh = MTTR(TINY)
    load_checkpoint(fresh, _save(tmp_path, ms_sd, wrap), from_modelscope)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_missing_key(tmp_path, ms_sd):
    sd = dict(ms_sd)
    del sd["spatial_decoder.gn2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): pixel_decoder\.norms\.1\.bias"):
        load_checkpoint(MTTR(TINY), _save(tmp_path, sd), from_modelscope)


def test_unexpected_key(tmp_path, ms_sd):
    sd = {**ms_sd, "transformer.text_encoder.pooler.dense.weight": torch.zeros(2, 2)}
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): text\.encoder\.pooler\.dense\.weight"
    ):
        load_checkpoint(MTTR(TINY), _save(tmp_path, sd), from_modelscope)


def test_misshaped_key(tmp_path, ms_sd):
    sd = dict(ms_sd)
    sd["obj_queries.weight"] = torch.zeros(7, TINY.d_model)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): query_embed\.weight"):
        load_checkpoint(MTTR(TINY), _save(tmp_path, sd), from_modelscope)


def test_all_problems_listed_at_once(tmp_path, ms_sd):
    sd = {k: v for k, v in ms_sd.items() if not k.startswith("backbone.downsamples.0.")}
    sd["spatial_decoder.lay5.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(MTTR(TINY), _save(tmp_path, sd), from_modelscope)
    msg = str(e.value)
    assert "backbone.merges.0.reduction.weight" in msg and "spatial_decoder.lay5.weight" in msg
