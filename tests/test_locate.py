"""The locator returns exactly the planted coordinates, iterates, terminates, and ranks."""

import pytest
import torch
from conftest import DRIVE, ONE, PROMPT, TRIGGER, TWO, Plant, build, byte_tokenizer, save

from sw_lens.locate import Criterion, locate, rank_by_effect
from sw_lens.models import load_model
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.vocabulary import WeightCoord


def ids(text=PROMPT):
    return torch.tensor(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])


def loaded_with(tmp_path, arch, plants):
    return load_model(str(save(build(arch, plants), tmp_path / "m")), device="cpu")


def test_a_planted_super_weight_is_found_at_its_exact_coordinates(tiny):
    result = locate(tiny.bridge, [ids()], prepend_bos=False)
    (found,) = result.candidates
    assert found.coord == WeightCoord(ONE.layer, ONE.row, ONE.col)
    assert found.value == ONE.value
    assert (found.iteration, found.role) == (1, "creates")
    # The HF parameter and index it names really hold the value, in that model's layout.
    param = tiny.bridge.original_model.get_parameter(found.hf_param)
    assert float(param.detach()[found.hf_index]) == ONE.value
    assert found.hf_param.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight"))
    assert result.termination == "iteration 2 exposed no new weight"


def test_two_planted_weights_in_different_layers_are_found_through_iteration(tmp_path, arch):
    loaded = loaded_with(tmp_path, arch, TWO)
    result = locate(loaded.bridge, [ids()], prepend_bos=False)
    found = [(c.coord, c.iteration) for c in result.candidates]
    assert found == [
        (WeightCoord(TWO[0].layer, TWO[0].row, TWO[0].col), 1),
        (WeightCoord(TWO[1].layer, TWO[1].row, TWO[1].col), 2),
    ]
    # The second was hidden in the first scan and exposed once the first was ablated.
    hidden, exposed = (scan.layers[TWO[1].layer].post for scan in result.scans[:2])
    assert hidden.magnitude < Criterion().min_abs <= exposed.magnitude
    assert (exposed.token, exposed.channel) == (TRIGGER, TWO[1].col)


def test_a_later_echo_of_the_super_activation_is_not_taken(tmp_path, arch):
    # Layer 3's neuron 30 reads the massive channel (and nothing the trigger token has)
    # and writes a spike of its own into channel 20: it qualifies in the first scan
    # together with layer 1, and vanishes once layer 1's weight is removed. The paper's
    # order takes layer 1's weight only. (A gated MLP's read grows as its square, and
    # RMSNorm lifts a small residual to unit size: a weak read keeps it silent elsewhere.)
    drive = {"gpt2": DRIVE["gpt2"], "llama": 1.5, "qwen2": 1.5}[arch]
    model = build(arch, [ONE])
    with torch.no_grad():
        if arch == "gpt2":  # Conv1D weights are [in, out]
            mlp = model.transformer.h[3].mlp
            mlp.c_fc.weight[:, 30] = 0.0
            mlp.c_fc.weight[ONE.row, 30] = drive
            mlp.c_proj.weight[30, :] = 0.0
            mlp.c_proj.weight[30, 20] = 4.0
        else:
            mlp = model.model.layers[3].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[30, :] = 0.0
                proj.weight[30, ONE.row] = drive
            mlp.down_proj.weight[:, 30] = 0.0
            mlp.down_proj.weight[20, 30] = 4.0
    loaded = load_model(str(save(model, tmp_path / "m")), device="cpu")
    first = locate(loaded.bridge, [ids()], prepend_bos=False, max_iterations=1)
    assert first.scans[0].layers[3].mlp_out.channel == 20  # it qualifies in scan 1
    assert any("layer 3: also qualifies; left for the next scan" in n for n in first.notes)
    result = locate(loaded.bridge, [ids()], prepend_bos=False)
    assert [(c.coord, c.iteration) for c in result.candidates] == [
        (WeightCoord(ONE.layer, ONE.row, ONE.col), 1)
    ]
    assert result.termination == "iteration 2 exposed no new weight"


def test_iteration_limit_stops_the_search(tmp_path):
    loaded = loaded_with(tmp_path, "llama", TWO)
    result = locate(loaded.bridge, [ids()], prepend_bos=False, max_iterations=1)
    assert [c.iteration for c in result.candidates] == [1]
    assert result.termination == "iteration limit (1) reached"


def test_a_still_spiking_neuron_gives_only_one_weight(tiny):
    # A second, smaller output weight of the planted neuron: once the first is ablated the
    # neuron still fires and this weight makes the layer's next output spike, so the
    # literal rule would take it, and then the next, forever.
    with torch.no_grad():
        tiny.bridge.blocks[ONE.layer].mlp.W_out[ONE.col, ONE.row + 1] = ONE.value / 2
    result = locate(tiny.bridge, [ids()], prepend_bos=False)
    assert [c.coord for c in result.candidates] == [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    assert result.scans[1].layers[ONE.layer].mlp_out.channel == ONE.row + 1
    assert any(f"input neuron {ONE.col} still spikes" in note for note in result.notes)
    assert result.termination == "iteration 2 exposed no new weight"


def test_a_layer_that_cancels_the_massive_activation_is_flagged(tmp_path, arch):
    # Layer 3's neuron reads the massive channel itself and writes against it.
    canceller = Plant(layer=3, row=ONE.row, col=30, dim=ONE.row, value=-4.0)
    loaded = loaded_with(tmp_path, arch, [ONE, canceller])
    result = locate(loaded.bridge, [ids()], prepend_bos=False)
    roles = {c.coord: c.role for c in result.candidates}
    assert roles[WeightCoord(ONE.layer, ONE.row, ONE.col)] == "creates"
    assert roles[WeightCoord(3, ONE.row, 30)] == "cancels"
    layer3 = result.scans[0].layers[3]
    assert abs(layer3.resid_mid + layer3.mlp_out.value) < abs(layer3.resid_mid)


def test_the_criterion_is_stated_with_its_numbers():
    text = Criterion(min_abs=7, min_ratio=3, min_ppl_ratio=1.5).describe()
    assert ">= 7 and >= 3x the median" in text and "by >= 1.5" in text


@pytest.mark.parametrize("min_ppl_ratio", [0.0, 1e9])
def test_ranking_measures_each_weight_alone(tiny, min_ppl_ratio):
    criterion = Criterion(min_abs=1.0, min_ppl_ratio=min_ppl_ratio)
    result = locate(tiny.bridge, [ids(), ids("more A text")], False, criterion)
    tokens = ids("The trigger A appears here, and A again. " * 4)
    protocol = Protocol(window=32)
    rank_by_effect(tiny.bridge, result, tokens, protocol, "test")
    baseline = evaluate(tiny.bridge, tokens, protocol, "test").perplexity
    assert result.ranking.perplexity == pytest.approx(baseline, rel=1e-4)  # eager vs sdpa
    effects = [c.effect for c in result.candidates]
    assert effects == sorted(effects, reverse=True)
    for c in result.candidates:
        alone = evaluate(tiny.bridge, tokens, protocol, "test", [c.coord]).perplexity
        assert c.ppl_alone == pytest.approx(alone, rel=1e-4)
        assert c.effect == pytest.approx(c.ppl_alone / result.ranking.perplexity)
        assert c.is_super == (min_ppl_ratio == 0.0)
