"""The decomposition is exact, and its verdict follows the numbers."""

import pytest
import torch
from conftest import (
    ONE,
    PROMPT,
    TRIGGER,
    build,
    byte_tokenizer,
    hf_config,
    plant,
    run_experiment,
    save,
)
from transformers import LlamaForCausalLM

from sw_lens.decompose import Decomposition, decompose, flipped_at, recreated_at, verdict
from sw_lens.models import load_model
from sw_lens.results import read_json

IDS = torch.tensor(byte_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"])


def test_products_plus_bias_equal_the_output_exactly(tiny):
    d = decompose(tiny.bridge, IDS, ONE.layer, ONE.row, keep=tiny.bridge.cfg.d_mlp)
    # Exact up to float32 rounding of the model's own matmul (~1e-7 relative).
    assert sum(v for _, v in d.top) + d.bias == pytest.approx(d.mlp_out, rel=1e-6)
    assert d.cumulative[-1] == pytest.approx(1.0 - d.bias_share, abs=1e-6)
    assert d.token == TRIGGER
    # Largest toward the output first: the shares grow while products add to the spike.
    assert d.top1_share <= d.top5_share <= d.top20_share
    toward = [v * (1 if d.mlp_out >= 0 else -1) for _, v in d.top]
    assert toward == sorted(toward, reverse=True)


def test_a_planted_super_weight_is_one_weight(tiny):
    d = decompose(tiny.bridge, IDS, ONE.layer, ONE.row)
    assert d.top[0][0] == ONE.col and d.top1_share > 0.99
    assert d.verdict == "one weight"
    assert "Verdict: one weight" in d.explanation and f"col {ONE.col}" in d.explanation


def test_a_spike_spread_over_50_weights_is_distributed(tmp_path):
    config = hf_config("llama")
    config.intermediate_size = 96
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    plant(model, "llama", [ONE])  # the trigger token, reading dimension ONE.dim
    with torch.no_grad():
        mlp = model.model.layers[ONE.layer].mlp
        for col in range(50):  # 50 neurons fire alike and share the output evenly
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[col, :] = 0.0
                proj.weight[col, ONE.dim] = 4.0
            mlp.down_proj.weight[:, col] = 0.0
            mlp.down_proj.weight[ONE.row, col] = ONE.value / 50
    loaded = load_model(str(save(model, tmp_path / "m")), device="cpu")
    d = decompose(loaded.bridge, IDS, ONE.layer, ONE.row)
    assert d.verdict == "distributed"
    assert d.top1_share < 0.05 and d.top20_share < 0.5


def test_a_spike_from_the_bias_is_bias(tmp_path):
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.h[2].mlp.c_proj.bias[7] = 500.0
    loaded = load_model(str(save(model, tmp_path / "m")), device="cpu")
    d = decompose(loaded.bridge, IDS, layer=2, row=7)
    assert d.verdict == "bias" and d.bias == 500.0 and d.bias_share > 0.95


def test_explain_prints_the_verdict_and_writes_results(tiny_dir, tmp_path):

    done = run_experiment(
        "explain.py",
        "--model",
        str(tiny_dir),
        "--prompt",
        PROMPT,
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"layer {ONE.layer} down_proj output" in done.stdout
        and "Verdict: one weight" in done.stdout
    )
    (d,) = read_json(tmp_path / "explain.json", "explain").decompositions  # schema-valid
    assert (d.layer, d.row, d.top[0][0]) == (ONE.layer, ONE.row, ONE.col)
    assert (tmp_path / "decomposition.png").is_file()


def decomposition(residual, residual_ablated) -> Decomposition:
    return Decomposition(
        layer=2, row=5, pos=0, token="A", mlp_out=900.0, bias=0.0, top=[(17, 899.0)],
        top1_share=0.999, top5_share=0.999, top20_share=0.999, bias_share=0.0,
        cumulative=[0.999], residual=residual, residual_ablated=residual_ablated, verdict="",
    )  # fmt: skip


def test_a_residual_of_the_opposite_sign_is_not_the_spike_re_created():
    """The case met on a real model: +886.8 unablated, -843.7 with the weight zeroed."""
    flipped = decomposition([900.0, 886.8, 880.0], [5.0, -843.7, -850.0])
    assert recreated_at(flipped) is None and flipped_at(flipped) == 3
    kind, text = verdict(flipped)
    assert kind == "one weight" and "-843.7 against +886.8" in text and "opposite sign" in text
    back = decomposition([900.0, 886.8], [5.0, 700.0])
    assert recreated_at(back) == 3 and flipped_at(back) is None
    assert verdict(back)[0] == "re-created downstream"
