"""The shared vocabulary: every layout names the planted scalar in the tensor it indexes,
and converting to a layout and back is the identity."""

import pytest
import torch
from conftest import ONE, build, save
from hypothesis import given
from hypothesis import strategies as st
from nanogpt_reference import CHARS, GPT, TRIGGER, model_args, plant

from sw_lens.errors import SwLensError
from sw_lens.models import load_model
from sw_lens.vocabulary import (
    LAYOUTS,
    WeightCoord,
    describe,
    down_proj_parameter,
    from_layout,
    to_layout,
)

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)


@pytest.mark.parametrize("layout", LAYOUTS)
@given(layer=st.integers(0, 80), row=st.integers(0, 20000), col=st.integers(0, 60000))
def test_every_layout_round_trips(layout, layer, row, col):
    coord = WeightCoord(layer, row, col)
    assert from_layout(layout, *to_layout(coord, layout)) == coord


def planted_value(tensor, layout):
    _, i, j = to_layout(PLANTED, layout)
    return float(tensor.detach()[i, j])


def test_hf_linear_and_transformer_lens_name_the_planted_scalar(tmp_path):
    loaded = load_model(str(save(build("llama", [ONE]), tmp_path / "llama")), device="cpu")
    hf = loaded.bridge.original_model
    down_proj = hf.get_parameter(down_proj_parameter(loaded.bridge, ONE.layer)[0])
    assert planted_value(down_proj, "hf_linear") == ONE.value
    assert planted_value(loaded.bridge.blocks[ONE.layer].mlp.W_out, "tl_w_out") == ONE.value
    assert describe(PLANTED, "hf_linear") == (
        f"{down_proj_parameter(loaded.bridge, ONE.layer)[0]}[{ONE.row}, {ONE.col}]"
    )


def test_gpt2_conv1d_names_the_planted_scalar():
    hf = build("gpt2", [ONE])
    c_proj = hf.transformer.h[ONE.layer].mlp.c_proj.weight  # Conv1D: [in, out]
    assert planted_value(c_proj, "gpt2_conv1d") == ONE.value
    assert c_proj[ONE.row, ONE.col] != ONE.value  # the untransposed index is another weight


def test_nanogpt_linear_names_the_planted_scalar():
    torch.manual_seed(0)
    model = GPT(model_args()).eval()
    plant(model, ONE.layer, ONE.row, ONE.col, 3, ONE.value, CHARS.index(TRIGGER))
    c_proj = model.state_dict()[f"transformer.h.{ONE.layer}.mlp.c_proj.weight"]
    assert planted_value(c_proj, "nanogpt_linear") == ONE.value
    assert describe(PLANTED, "nanogpt_linear").startswith(f"transformer.h.{ONE.layer}.mlp.c_proj")


def test_an_unknown_layout_is_one_line():
    with pytest.raises(SwLensError, match="unknown layout 'conv2d'"):
        to_layout(PLANTED, "conv2d")
