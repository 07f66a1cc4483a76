"""Round-to-nearest quantization: within its bound, the super weight kept exactly in (iii),
the model restored bit-for-bit, and on the toy model (iii) beats (i) and (ii) at
tensor-wide blocks."""

import pytest
import torch
from conftest import TOY

from sw_lens.corpora import tokenize
from sw_lens.errors import SwLensError
from sw_lens.models import load_model
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.quantize import Scheme, clip, quantize_weight, quantized, rtn
from sw_lens.vocabulary import WeightCoord, down_proj_parameter

TOY_SW = WeightCoord(TOY.layer, TOY.row, TOY.col)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [None, 128, 1000])  # 1000 leaves a partial block
def test_rtn_error_is_within_half_a_step(bits, block_size):
    torch.manual_seed(bits)
    weight = torch.randn(96, 100) * 0.02
    weight[7, 3] = 5.0  # an outlier stretches its block's range
    dequantized, scale = rtn(weight, bits, block_size)
    size = block_size or weight.numel()
    step = scale.repeat_interleave(size)[: weight.numel()].view_as(weight)
    assert ((dequantized - weight).abs() <= step / 2 * (1 + 1e-5)).all()
    blocks = torch.split(dequantized.flatten(), size)
    assert all(len(block.unique()) <= 2**bits for block in blocks)
    assert len(scale) == -(-weight.numel() // size)


def test_clipping_by_zscore_and_percentile():
    weight = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([50.0])])
    clipped = clip(weight, "zscore", 3.0)
    assert clipped.max() == pytest.approx(float(weight.mean() + 3 * weight.std()))
    assert torch.equal(clipped[:999], weight[:999])
    clipped = clip(weight, "percentile", 99.9)
    assert clipped.max() == pytest.approx(float(weight.abs().sort().values[998]))


def test_the_super_weight_is_kept_exactly_only_in_the_super_weight_method():
    torch.manual_seed(0)
    weight = torch.randn(32, 48) * 0.02
    weight[5, 17] = 8.123456
    kept = quantize_weight(weight, Scheme(3, None, "clipped + super weight"), keep=[(5, 17)])
    assert kept[5, 17] == weight[5, 17]
    clipped = quantize_weight(weight, Scheme(3, None, "clipped"), keep=[(5, 17)])
    assert clipped[5, 17] < 1.0
    plain = quantize_weight(weight, Scheme(3, None, "plain"), keep=[(5, 17)])
    assert plain[5, 17] != weight[5, 17]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1, "block_size": None}, "bits must be between 2 and 16"),
        ({"bits": 4, "block_size": 1}, "block size must be at least 2"),
        ({"bits": 4, "block_size": None, "method": "gptq"}, "unknown method 'gptq'"),
        ({"bits": 4, "block_size": None, "clip": "percentile", "clip_value": 100}, "(0, 100)"),
    ],
)
def test_bad_schemes_are_one_line(kwargs, message):
    with pytest.raises(SwLensError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Scheme(**kwargs)


def test_quantized_restores_every_parameter_bit_for_bit(tiny):
    model = tiny.bridge
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    name, _ = down_proj_parameter(model, 1)
    with pytest.raises(RuntimeError, match="inside"):
        with quantized(model, Scheme(3, 128), all_linear=True) as names:
            assert name in names and len(names) > model.cfg.n_layers  # attention too
            now = model.original_model.state_dict()
            changed = [k for k in before if not torch.equal(before[k], now[k])]
            assert changed
            raise RuntimeError("inside")
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_on_the_toy_model_keeping_the_super_weight_wins_at_tensor_wide_blocks(toy):
    loaded = load_model(str(toy), device="cpu")
    model = loaded.bridge
    tokens = tokenize(loaded.tokenizer, (toy / "corpus.txt").read_text())
    protocol = Protocol(window=32, max_tokens=2048, batch_size=16)
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    baseline = evaluate(model, tokens, protocol, "toy").perplexity
    for bits in (4, 3):
        ppl = {}
        for method in ("plain", "clipped", "clipped + super weight"):
            with quantized(model, Scheme(bits, None, method, clip_value=3.0), [TOY_SW]):
                w_out = model.blocks[TOY.layer].mlp.W_out
                if method == "clipped + super weight":
                    assert w_out[TOY.col, TOY.row] == TOY.value  # exactly preserved
                ppl[method] = evaluate(model, tokens, protocol, "toy").perplexity
        assert (
            ppl["clipped + super weight"] < ppl["plain"]
            and ppl["clipped + super weight"] < ppl["clipped"]
        )
        assert ppl["clipped + super weight"] < 1.5 * baseline
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
