"""Hook ablation must equal editing the HF weight, and must never touch parameters."""

import copy

import pytest
import torch
from conftest import ONE, PROMPT, build, byte_tokenizer, save

from sw_lens.errors import SwLensError
from sw_lens.models import load_model
from sw_lens.patching import ablation_hooks, edited_weights
from sw_lens.vocabulary import WeightCoord


def hf_down_proj(hf_model, arch: str, layer: int):
    """The HF parameter, reached by its architecture's own name (not through the bridge)."""
    if arch == "gpt2":
        return hf_model.transformer.h[layer].mlp.c_proj.weight  # Conv1D: [in, out]
    return hf_model.model.layers[layer].mlp.down_proj.weight  # Linear: [out, in]


def hf_logits_with_edit(hf_model, arch, coords, scale, ids):
    """Reference: edit the HF weight of an independent copy and run plain HF."""
    edited = copy.deepcopy(hf_model)
    with torch.no_grad():
        for c in coords:
            w = hf_down_proj(edited, arch, c.layer)
            index = (c.col, c.row) if arch == "gpt2" else (c.row, c.col)
            w[index] *= scale
        return edited(ids).logits


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_hook_ablation_equals_editing_the_hf_weight(tmp_path, arch, scale):
    hf_model = build(arch, [ONE])
    loaded = load_model(str(save(hf_model, tmp_path / "m")), device="cpu")
    reference_model = build(arch, [ONE])  # same seed: identical weights, never booted
    ids = torch.tensor([byte_tokenizer()(PROMPT + " and more A text")["input_ids"]])
    coords = [
        WeightCoord(ONE.layer, ONE.row, ONE.col),
        WeightCoord(3, 7, 11),
        WeightCoord(3, 2, 11),
    ]
    before = {k: v.clone() for k, v in loaded.bridge.original_model.state_dict().items()}

    with torch.inference_mode():
        patched = loaded.bridge.run_with_hooks(
            ids, fwd_hooks=ablation_hooks(loaded.bridge, coords, scale)
        )
        clean = loaded.bridge(ids)
    expected = hf_logits_with_edit(reference_model, arch, coords, scale, ids)

    assert (patched - expected).abs().max() <= 1e-5
    assert (clean - expected).abs().max() > 1e-2  # the ablation does something here
    after = loaded.bridge.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_edited_weights_matches_hooks_and_restores_bit_for_bit(tiny):
    model = tiny.bridge
    coords = [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    ids = torch.tensor([byte_tokenizer()(PROMPT)["input_ids"]])
    before = model.blocks[ONE.layer].mlp.W_out.detach().clone()
    with torch.inference_mode():
        hooked = model.run_with_hooks(ids, fwd_hooks=ablation_hooks(model, coords))
    with edited_weights(model, coords), torch.inference_mode():
        assert model.blocks[ONE.layer].mlp.W_out[ONE.col, ONE.row] == 0
        edited = model(ids)
    assert (hooked - edited).abs().max() <= 1e-5
    assert torch.equal(model.blocks[ONE.layer].mlp.W_out.detach(), before)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_edited_weights_restores_when_the_body_raises(tiny, exc):
    model = tiny.bridge
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    with pytest.raises(exc), edited_weights(model, [WeightCoord(ONE.layer, ONE.row, ONE.col)], 3.0):
        raise exc()
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "coord, message",
    [
        (WeightCoord(6, 0, 0), "layer out of range, the model has 6 layers"),
        (WeightCoord(0, 32, 0), "row out of range, d_model is 32"),
        (WeightCoord(0, 0, 48), "col out of range, d_mlp is 48"),
        (WeightCoord(-1, 0, 0), "layer out of range"),
    ],
)
def test_out_of_range_coordinates_are_refused(tiny, coord, message):
    with pytest.raises(SwLensError, match=message):
        ablation_hooks(tiny.bridge, [coord])
    with pytest.raises(SwLensError, match=message), edited_weights(tiny.bridge, [coord]):
        pass


def test_w_out_index_is_transformer_lens_order():
    assert WeightCoord(layer=2, row=3968, col=7003).w_out_index == (2, 7003, 3968)
