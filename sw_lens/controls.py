"""Controls that make a super weight's effect mean something (paper, Sec. 3.2 and Table 1).

Zeroing one weight and watching perplexity rise says little until it is compared with
zeroing *other* weights: (b) the N largest-magnitude down-projection weights of the
whole model, super weights excluded (the paper's N = 7000), (c) those plus the super
weights, and (d) random weights as many as the super weights, each drawn from the
weights of the same matrix nearest in magnitude to its super weight. (e) scales the
super weights instead of zeroing them. All of it through hooks, or as layers are read
when the model is streamed from its checkpoint: the model is never edited.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean, stdev

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import SwLensError
from sw_lens.locate import RuleModel, rule_model
from sw_lens.patching import by_layer
from sw_lens.perplexity import PerplexityResult, Protocol
from sw_lens.vocabulary import WeightCoord


def _coord(layer: int, flat: int, d_model: int) -> WeightCoord:
    """A flat index into ``W_out[layer]`` ([d_mlp, d_model]) as a `WeightCoord`."""
    col, row = divmod(flat, d_model)
    return WeightCoord(layer, row, col)


def largest_weights(
    model: TransformerBridge | RuleModel, n: int, exclude: Sequence[WeightCoord] = ()
) -> list[WeightCoord]:
    """The `n` down-projection weights of largest |value| over all layers, not counting
    `exclude`; largest first. Holds one layer's |W_out| at a time."""
    if n < 0:
        raise SwLensError(f"the number of largest weights must be >= 0, got {n}")
    model = rule_model(model)
    excluded = set(exclude)
    best: list[tuple[float, WeightCoord]] = []
    for layer in range(model.n_layers):
        with model.w_out(layer) as weight:
            d_model = weight.shape[1]
            magnitude = weight.detach().abs().flatten()
        top = magnitude.topk(min(n + len(excluded), magnitude.numel()))
        best += [
            (float(v), _coord(layer, int(i), d_model))
            for v, i in zip(top.values.float().cpu(), top.indices.cpu(), strict=True)
        ]
    best.sort(key=lambda pair: (-pair[0], pair[1]))
    return [c for _, c in best if c not in excluded][:n]


def magnitude_matched(
    model: TransformerBridge | RuleModel,
    super_weights: Sequence[WeightCoord],
    draws: int,
    pool: int = 100,
    seed: int = 0,
) -> list[list[WeightCoord]]:
    """`draws` random sets, each with one weight per super weight, drawn uniformly from the
    `pool` weights of the same matrix nearest in |value| to it (super weights excluded)."""
    model = rule_model(model)
    model.check_coords(super_weights)
    excluded = set(super_weights)
    generator = torch.Generator().manual_seed(seed)
    candidates = []
    for layer, coords in by_layer(super_weights).items():
        with model.w_out(layer) as weight:
            d_model = weight.shape[1]
            w = weight.detach().float().cpu().flatten().clone()
        for c in coords:
            target = abs(float(w[c.col * d_model + c.row]))
            order = ((w.abs() - target).abs()).argsort()
            near = [_coord(layer, int(i), d_model) for i in order[: pool + len(coords)]]
            candidates.append([n for n in near if n not in excluded][:pool])
    return [
        [near[int(torch.randint(len(near), (1,), generator=generator))] for near in candidates]
        for _ in range(draws)
    ]


@dataclass
class ControlRow:
    label: str
    kind: str  # "super", "largest", "largest + super", "random", "scaled"
    n_weights: int
    perplexity: float
    nll: float
    ratio: float  # perplexity / baseline perplexity
    scale: float = 0.0


def _row(label, kind, coords, result: PerplexityResult, baseline, scale=0.0) -> ControlRow:
    return ControlRow(
        label,
        kind,
        len(coords),
        result.perplexity,
        result.nll,
        result.perplexity / baseline.perplexity,
        scale,
    )


def run_controls(
    model: TransformerBridge | RuleModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    super_weights: Sequence[WeightCoord],
    n_largest: int = 7000,
    draws: int = 10,
    scales: Sequence[float] = (0.5, 2.0),
    pool: int = 100,
    seed: int = 0,
) -> tuple[PerplexityResult, list[ControlRow], dict]:
    """Baseline and controls (a)-(e) on the same tokens; returns the baseline, one row per
    measurement, and a summary: the random draws' mean, std, min and max perplexity,
    and how far control (b) reaches."""
    if not super_weights:
        raise SwLensError("controls need at least one super weight")
    model = rule_model(model)
    super_weights = list(super_weights)
    largest = largest_weights(model, n_largest, exclude=super_weights)
    random_sets = magnitude_matched(model, super_weights, draws, pool, seed)
    ablations = [super_weights, largest, largest + super_weights, *random_sets]
    ablations += [super_weights] * len(scales)
    factors = [0.0] * (3 + len(random_sets)) + list(scales)
    baseline, results = model.sweep(tokens, protocol, corpus, ablations, "controls", factors)
    random_results = results[3 : 3 + len(random_sets)]
    rows = [
        _row("(a) super weights zeroed", "super", super_weights, results[0], baseline),
        _row(f"(b) {n_largest} largest others zeroed", "largest", largest, results[1], baseline),
        _row(
            f"(c) {n_largest} largest + super weights zeroed",
            "largest + super",
            largest + super_weights,
            results[2],
            baseline,
        ),
    ]
    rows += [
        _row(f"(d) random draw {i}", "random", picks, result, baseline)
        for i, (picks, result) in enumerate(zip(random_sets, random_results, strict=True))
    ]
    rows += [
        _row(f"(e) super weights x{s:g}", "scaled", super_weights, r, baseline, s)
        for s, r in zip(scales, results[3 + len(random_sets) :], strict=True)
    ]
    random_ppl = [r.perplexity for r in random_results]
    d_mlp, d_model = model.w_out_shape
    summary = {
        "draws": len(random_ppl),
        "pool": pool,
        "mean": mean(random_ppl) if random_ppl else None,
        "std": stdev(random_ppl) if len(random_ppl) > 1 else None,
        "min": min(random_ppl, default=None),
        "max": max(random_ppl, default=None),
        # N as a share of all down-projection weights (the paper's 7000 in Llama-7B's
        # 1.4e9 is 5e-6), and the smallest |w| among them: how far down (b) reaches.
        "largest_share": n_largest / (model.n_layers * d_mlp * d_model),
        "largest_min_abs": abs(model.weight(largest[-1])[0]) if largest else None,
    }
    return baseline, rows, summary
