"""The fast evaluation path (HF twin, sdpa) equals the bridge; the sweep equals the loop."""

import pytest
import torch
from conftest import ONE, TWO
from test_perplexity import corpus_ids

from sw_lens.fast import hf_twin
from sw_lens.patching import edited_weights
from sw_lens.perplexity import Protocol, evaluate, evaluate_sweep
from sw_lens.vocabulary import WeightCoord, down_proj_parameter

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)


def keep_hook(act, hook):  # any TransformerLens hook sends evaluate through the bridge
    return act


def bridge_path(model, tokens, protocol, ablation=(), scale=0.0):
    hooks = [("hook_embed", keep_hook)]
    return evaluate(model, tokens, protocol, "t", ablation, scale, fwd_hooks=hooks)


@pytest.mark.parametrize("ablation", [(), (PLANTED,), (PLANTED, WeightCoord(3, 2, 11))])
def test_fast_path_equals_the_bridge_path(tiny, ablation):
    protocol = Protocol(window=64, batch_size=3)
    fast = evaluate(tiny.bridge, corpus_ids(), protocol, "t", ablation)
    slow = bridge_path(tiny.bridge, corpus_ids(), protocol, ablation)
    assert fast.perplexity == pytest.approx(slow.perplexity, rel=1e-4)
    assert torch.allclose(fast.token_nll, slow.token_nll, atol=1e-4)
    assert torch.equal(fast.positions, slow.positions)


def test_the_twin_shares_every_weight_and_sees_in_place_edits(tiny):
    bridge = tiny.bridge
    twin = hf_twin(bridge)
    assert hf_twin(bridge) is twin  # built once
    name, _ = down_proj_parameter(bridge, ONE.layer)
    assert twin.get_parameter(name).data_ptr() == bridge.blocks[ONE.layer].mlp.W_out.data_ptr()
    protocol = Protocol(window=64)
    zeroed = evaluate(bridge, corpus_ids(), protocol, "t", [PLANTED])
    with edited_weights(bridge, [PLANTED]):
        edited = evaluate(bridge, corpus_ids(), protocol, "t")
    assert edited.perplexity == pytest.approx(zeroed.perplexity, rel=1e-6)
    assert all(not m._forward_hooks for m in twin.modules())  # ablation hooks removed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: position embeddings, no reuse
def test_the_sweep_equals_the_naive_loop(tmp_path, arch):
    from conftest import build, save

    from sw_lens.models import load_model

    model = load_model(str(save(build(arch, TWO), tmp_path / "m")), device="cpu").bridge
    ablations = [
        [WeightCoord(3, 20, 30)],
        [WeightCoord(4, 1, 2), WeightCoord(5, 3, 4)],
        [WeightCoord(3, 20, 30)],
    ]
    protocol = Protocol(window=48, stride=16, batch_size=2)
    baseline, swept = evaluate_sweep(model, corpus_ids(), protocol, "t", ablations, scale=0.5)
    naive = [evaluate(model, corpus_ids(), protocol, "t", a, 0.5) for a in [(), *ablations]]
    for result, reference in zip([baseline, *swept], naive, strict=True):
        assert result.n_tokens == reference.n_tokens
        assert torch.allclose(result.token_nll, reference.token_nll, atol=1e-6, rtol=0)
    assert swept[0].perplexity != baseline.perplexity  # the ablation did something


def test_the_sweep_runs_only_the_layers_after_the_ablation(tiny, monkeypatch):
    from sw_lens import fast

    calls = []
    twin = hf_twin(tiny.bridge)
    parent, name = fast.decoder_layers(tiny.bridge, twin)
    for index, layer in enumerate(getattr(parent, name)):
        layer.register_forward_pre_hook(lambda *a, i=index: calls.append(i))
    tokens, ablation = corpus_ids()[:64], [[WeightCoord(4, 0, 0)]]
    evaluate_sweep(tiny.bridge, tokens, Protocol(window=64), "t", ablation)
    # The reuse check (a short pass and its replay from layer 4), the baseline pass, then
    # the ablation.
    check, baseline = [0, 1, 2, 3, 4, 5, 4, 5], [0, 1, 2, 3, 4, 5]
    if tiny.bridge.original_model.config.model_type == "gpt2":  # the check fails: whole pass
        assert calls == check + baseline + [0, 1, 2, 3, 4, 5]
    else:
        assert calls == check + baseline + [4, 5]
