"""Is a spike made by one weight? The down-projection output, decomposed exactly.

At a token ``pos`` and output channel ``row`` of layer ``l``,
``mlp_out[pos, row] = sum_col hook_post[pos, col] * W_out[col, row] + b_out[row]``.
A genuine super weight is one product carrying most of that sum. A spike spread over
many products, or carried by the bias, or re-created downstream once the weight is
zeroed, explains a "super weight" whose zeroing changes nothing (the original project's
GPT-2 finding). `decompose` reports the numbers and a verdict that says which holds.
"""

from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.patching import ablation_hooks, check_coords
from sw_lens.vocabulary import (
    WeightCoord,
    b_out,
    hook_down_out,
    hook_post,
    hook_resid_post,
    w_out,
)

ONE_WEIGHT = 0.5  # top-1 product's share of the spike to call it one weight
BIAS = 0.5  # bias share to call it bias-made
RECREATED = 0.5  # share of the residual spike back at a later layer with the weight zeroed


@dataclass
class Decomposition:
    layer: int
    row: int
    pos: int
    token: str
    mlp_out: float  # the down-projection output at (pos, row)
    bias: float  # b_out[row], 0 where the model has none
    top: list[tuple[int, float]]  # (col, hook_post * W_out), largest toward the output first
    top1_share: float  # shares of mlp_out, signed
    top5_share: float
    top20_share: float
    bias_share: float
    cumulative: list[float]  # share of the first k products, k = 1..len(top)
    residual: list[float]  # resid_post[pos, row] at each later layer, as is
    residual_ablated: list[float]  # ... with the top product's weight zeroed
    verdict: str
    explanation: str = field(default="")


def decompose(
    model: TransformerBridge,
    ids: Int[Tensor, "pos"],
    layer: int,
    row: int,
    pos: int | None = None,
    keep: int = 50,
) -> Decomposition:
    """Decompose the down-projection output of `layer` at output channel `row`, at `pos`
    (default: the token where |mlp_out[:, row]| is largest)."""
    check_coords(model, [WeightCoord(layer, row, 0)])
    names = {hook_post(layer), hook_down_out(layer)}
    names |= {hook_resid_post(later) for later in range(layer, model.cfg.n_layers)}
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            ids[None].to(model.cfg.device), names_filter=names.__contains__
        )
    post = cache[hook_post(layer)][0].double()
    out = cache[hook_down_out(layer)][0, :, row].double()
    pos = int(out.abs().argmax()) if pos is None else pos
    with w_out(model, layer) as weight:
        column = weight.detach()[:, row].double()
        bias = b_out(model, layer)
        bias = 0.0 if bias is None else float(bias.detach()[row])
    products = post[pos] * column
    total = float(out[pos])
    # Largest first in the direction of the output: the top-k shares then only grow
    # while products add to the spike (by |product| a top-5 share could fall below the
    # top-1 share, when products 2-5 oppose it).
    order = (products * (1.0 if total >= 0 else -1.0)).argsort(descending=True)
    shares = (products[order].cumsum(0) / total).tolist()
    top_col = int(order[0])
    residual = [
        float(cache[hook_resid_post(later)][0, pos, row])
        for later in range(layer, model.cfg.n_layers)
    ]
    hooks = ablation_hooks(model, [WeightCoord(layer, row, top_col)])
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        _, ablated_cache = model.run_with_cache(
            ids[None].to(model.cfg.device), names_filter=names.__contains__
        )
    residual_ablated = [
        float(ablated_cache[hook_resid_post(later)][0, pos, row])
        for later in range(layer, model.cfg.n_layers)
    ]
    result = Decomposition(
        layer=layer,
        row=row,
        pos=pos,
        token=model.tokenizer.decode([int(ids[pos])]),
        mlp_out=total,
        bias=bias,
        top=[(int(c), float(products[c])) for c in order[:keep]],
        top1_share=shares[0],
        top5_share=shares[min(4, len(shares) - 1)],
        top20_share=shares[min(19, len(shares) - 1)],
        bias_share=bias / total,
        cumulative=shares[:keep],
        residual=residual,
        residual_ablated=residual_ablated,
        verdict="",
    )
    result.verdict, result.explanation = verdict(result)
    return result


def _later(d: Decomposition, same_sign: bool) -> int | None:
    """The first later layer whose residual, with the top weight zeroed, is at least
    `RECREATED` of its unablated value in size, with the same sign (or the opposite),
    while that value is still massive (at least `RECREATED` of the spike layer's); None
    when there is none, or when zeroing the weight did not remove the spike at all."""
    here, here_ablated = abs(d.residual[0]), abs(d.residual_ablated[0])
    if not here or here_ablated >= RECREATED * here:
        return None
    for offset, (orig, ablated) in enumerate(zip(d.residual, d.residual_ablated, strict=True)):
        large = abs(orig) >= RECREATED * here and abs(ablated) >= RECREATED * abs(orig)
        if offset and large and (ablated * orig > 0) == same_sign:
            return d.layer + offset
    return None


def recreated_at(d: Decomposition) -> int | None:
    """Where later layers re-create the spike with the top weight zeroed: the same sign
    and at least `RECREATED` of the unablated size (a large value of the opposite sign is
    something else, `flipped_at`)."""
    return _later(d, same_sign=True)


def flipped_at(d: Decomposition) -> int | None:
    """Where, with the top weight zeroed, a later residual is as large but of the
    opposite sign: later layers write that channel whatever the spike was."""
    return _later(d, same_sign=False)


def verdict(d: Decomposition) -> tuple[str, str]:
    """ "one weight", "bias", "distributed" or "re-created downstream", with the numbers."""
    where = f"layer {d.layer} down_proj output[{d.pos}, {d.row}] = {d.mlp_out:.4g} on {d.token!r}"
    shares = (
        f"top-1 product {d.top1_share:.1%} of it (col {d.top[0][0]}), top-5 "
        f"{d.top5_share:.1%}, top-20 {d.top20_share:.1%}, bias {d.bias_share:.1%}"
    )
    if d.bias_share >= BIAS:
        kind, why = "bias", "the bias, not a weight, carries the spike"
    elif d.top1_share < ONE_WEIGHT:
        kind, why = "distributed", "no single product carries most of the spike"
    elif (layer := recreated_at(d)) is not None:
        kind = "re-created downstream"
        why = (
            f"one weight makes it, but with that weight zeroed layer {layer}'s residual "
            f"stream is back to {abs(d.residual_ablated[layer - d.layer]):.4g} (vs "
            f"{abs(d.residual[layer - d.layer]):.4g} unablated)"
        )
    else:
        kind, why = "one weight", "a single product carries most of the spike"
        if (layer := flipped_at(d)) is not None:
            i = layer - d.layer
            why += (
                f"; with it zeroed, layer {layer}'s residual is {d.residual_ablated[i]:+.4g} "
                f"against {d.residual[i]:+.4g} unablated: as large, of the opposite sign, so "
                f"later layers write that channel whatever the spike was (not a re-creation)"
            )
    return kind, f"{where}: {shares}. Verdict: {kind} - {why}."
