"""Controls (a)-(e): the largest weights and the magnitude-matched draws are what they
claim to be, and on the toy model the super weight matters far more than the N largest."""

import pytest
import torch
from conftest import ONE, TOY

from sw_lens.controls import largest_weights, magnitude_matched, run_controls
from sw_lens.corpora import tokenize
from sw_lens.models import load_model
from sw_lens.patching import weight_value
from sw_lens.perplexity import Protocol
from sw_lens.vocabulary import WeightCoord

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)
TOY_SW = WeightCoord(TOY.layer, TOY.row, TOY.col)
TOY_PROTOCOL = Protocol(window=32, max_tokens=2048, batch_size=16)


def test_largest_weights_are_the_top_magnitudes_over_all_layers(tiny):
    model = tiny.bridge
    found = largest_weights(model, 50, exclude=[PLANTED])
    w_out = torch.stack([block.mlp.W_out.detach() for block in model.blocks])  # layer col row
    flat = w_out.abs().flatten()
    layer, col, row = ONE.layer, ONE.col, ONE.row
    flat[(layer * model.cfg.d_mlp + col) * model.cfg.d_model + row] = -1.0  # excluded
    expected = flat.topk(50).values
    assert torch.equal(torch.tensor([abs(weight_value(model, c)) for c in found]), expected)
    assert PLANTED not in found and len(set(found)) == 50


def test_magnitude_matched_draws_come_from_the_nearest_magnitudes(tiny):
    model = tiny.bridge
    draws = magnitude_matched(model, [PLANTED], draws=20, pool=10, seed=1)
    w = model.blocks[ONE.layer].mlp.W_out.detach()
    distance = (w.abs() - abs(ONE.value)).abs().flatten()
    distance[PLANTED.col * model.cfg.d_model + PLANTED.row] = float("inf")
    tenth = distance.sort().values[9]
    for (pick,) in draws:
        assert pick.layer == ONE.layer and pick != PLANTED
        assert abs(abs(weight_value(model, pick)) - ONE.value) <= tenth
    assert draws == magnitude_matched(model, [PLANTED], draws=20, pool=10, seed=1)
    assert len({tuple(d) for d in draws}) > 1  # random, not one weight


@pytest.fixture(scope="module")
def toy_model(toy):
    loaded = load_model(str(toy), device="cpu")
    return loaded, tokenize(loaded.tokenizer, (toy / "corpus.txt").read_text())


def test_on_the_toy_model_the_super_weight_matters_more_than_the_largest_others(toy_model):
    loaded, tokens = toy_model
    model = loaded.bridge
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    baseline, rows, summary = run_controls(
        model, tokens, TOY_PROTOCOL, "toy", [TOY_SW], n_largest=100, draws=4, scales=(0.5, 2.0)
    )
    by_label = {r.label[:3]: r for r in rows if r.kind != "random"}
    a, b, c = by_label["(a)"], by_label["(b)"], by_label["(c)"]
    assert a.ratio - 1 > 5 * (b.ratio - 1) and a.ratio > 3
    assert c.ratio > b.ratio
    assert (a.n_weights, b.n_weights, c.n_weights) == (1, 100, 101)
    assert summary["draws"] == 4 and abs(summary["mean"] / baseline.perplexity - 1) < 0.05
    scaled = [r for r in rows if r.kind == "scaled"]
    assert [r.scale for r in scaled] == [0.5, 2.0] and all(r.ratio > 1 for r in scaled)
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
