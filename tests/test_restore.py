"""Restoring the super activation: exact where it was massive, ablated elsewhere, and on the
toy model it recovers most of what zeroing the super weight lost."""

import math

import pytest
import torch
from conftest import ONE, PROMPT, TOY

from sw_lens.corpora import tokenize
from sw_lens.models import load_model
from sw_lens.patching import ablation_hooks
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.restore import restore
from sw_lens.setup import prompt_tokens
from sw_lens.vocabulary import WeightCoord

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)


def test_restoring_keeps_massive_positions_and_ablates_the_rest(tiny):
    model = tiny.bridge
    ids = prompt_tokens(tiny, [PROMPT + " and A again"], False)[0][None]
    name = f"blocks.{ONE.layer}.mlp.out.hook_out"  # the down-projection output
    _, clean = model.run_with_cache(ids, names_filter=name)
    with model.hooks(fwd_hooks=ablation_hooks(model, [PLANTED])):
        _, zeroed = model.run_with_cache(ids, names_filter=name)
    original = clean[name][0, :, ONE.row]
    threshold = 0.5 * float(original.abs().max())
    massive = original.abs() >= threshold
    assert 0 < int(massive.sum()) < len(original)  # the two "A" tokens, not the rest
    hooks = ablation_hooks(model, [PLANTED], restore_above={(ONE.layer, ONE.row): threshold})
    with model.hooks(fwd_hooks=hooks):
        _, restored = model.run_with_cache(ids, names_filter=name)
    out = restored[name][0, :, ONE.row]
    assert torch.equal(out[massive], original[massive])
    assert torch.equal(out[~massive], zeroed[name][0, :, ONE.row][~massive])
    other = torch.arange(model.cfg.d_model) != ONE.row
    assert torch.equal(restored[name][0][:, other], clean[name][0][:, other])


def test_a_threshold_of_infinity_is_the_plain_ablation(tiny):
    tokens = tokenize(tiny.tokenizer, "some text with A in it and A again. " * 8)
    protocol = Protocol(window=64, max_tokens=256)
    plain = evaluate(tiny.bridge, tokens, protocol, "t", [PLANTED])
    never = evaluate(
        tiny.bridge, tokens, protocol, "t", [PLANTED], restore_above={(1, ONE.row): math.inf}
    )
    assert never.nll == plain.nll and never.n_restored == 0


def test_on_the_toy_model_restoring_recovers_most_of_the_loss(toy):
    loaded = load_model(str(toy), device="cpu")
    model = loaded.bridge
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    tokens = tokenize(loaded.tokenizer, (toy / "corpus.txt").read_text())
    protocol = Protocol(window=32, max_tokens=2048, batch_size=16)
    texts = prompt_tokens(loaded, ["the cat sat on the mat."], False)
    sw = WeightCoord(TOY.layer, TOY.row, TOY.col)
    result = restore(model, tokens, protocol, "toy", [sw], texts, fraction=0.5)
    assert result.ablated.perplexity > 3 * result.baseline.perplexity
    assert result.recovered >= 0.5
    assert result.restored.n_restored > 0
    recovered = (result.ablated.nll - result.restored.nll) / (
        result.ablated.nll - result.baseline.nll
    )
    assert result.recovered == pytest.approx(recovered)
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
