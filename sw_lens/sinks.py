"""Attention sinks: how much attention each head puts on the super-activation token, with
the super weights in place and with them zeroed.

The super activation sits on a few tokens (on the embedded model, the first token of
every window). "Massive activations" (Sun et al., 2024) showed that such tokens act as
attention sinks: heads park attention there when they have nothing to read. If zeroing a
super weight removes the sink, those heads spread their attention over real tokens, and
what they then read is one way the weight's effect reaches the output. The map here says
which heads lose their sink; `sw_lens.mediation` says whether that matters for the loss.

Attention patterns exist only in the bridge (``blocks.{l}.attn.hook_pattern``), so this
runs there, the ablation as hooks (`patching.ablation_hooks`); each pattern is reduced
inside its hook and never kept.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.patching import ablation_hooks
from sw_lens.vocabulary import WeightCoord, hook_down_out, hook_pattern


def super_activation(
    model: TransformerBridge, batches: Iterable[Int[Tensor, "batch pos"]], coord: WeightCoord
) -> list[Float[Tensor, "batch pos"]]:
    """The down-projection's own output at `coord`'s layer and output channel (the super
    activation), per batch, in the unedited model."""
    values = []

    def keep(out: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> None:
        values.append(out[..., coord.row].detach().float().cpu())

    with torch.inference_mode(), model.hooks(fwd_hooks=[(hook_down_out(coord.layer), keep)]):
        for ids in batches:
            model(ids, return_type=None, stop_at_layer=coord.layer + 1)
    if not all(torch.isfinite(v).all() for v in values):
        raise NonFiniteActivation(
            f"the super activation of {coord} is NaN or infinite in {model.cfg.dtype}"
        )
    return values


def sink_masks(
    values: Sequence[Float[Tensor, "batch pos"]], fraction: float
) -> list[Bool[Tensor, "batch pos"]]:
    """The super-activation tokens: where |value| reaches `fraction` of its largest
    magnitude over all the texts."""
    peak = max(float(v.abs().max()) for v in values)
    if peak == 0:
        raise SwLensError("the super activation is zero on every token: no sink to map")
    return [v.abs() >= fraction * peak for v in values]


@dataclass
class SinkMap:
    """Mean attention mass on the super-activation tokens, per layer and head, over the
    queries that come after one (a sink token's own query is not counted)."""

    n_queries: int
    sink_positions: list[list[int]]  # per sequence
    peak_positions: list[int]  # per sequence, where the super activation is largest
    clean: Float[Tensor, "n_layers n_heads"]
    zeroed: Float[Tensor, "n_layers n_heads"]

    @property
    def difference(self) -> Float[Tensor, "n_layers n_heads"]:
        """clean - zeroed: the attention a head no longer parks on the sink."""
        return self.clean - self.zeroed

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The `k` (layer, head) pairs whose mass changed most, either way."""
        order = self.difference.abs().flatten().argsort(descending=True)[:k]
        n_heads = self.clean.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]

    def to_dict(self) -> dict:
        return {
            "n_queries": self.n_queries,
            "sink_positions": self.sink_positions,
            "peak_positions": self.peak_positions,
            "clean": self.clean.tolist(),
            "zeroed": self.zeroed.tolist(),
        }


def _mass(
    model: TransformerBridge,
    batches: Sequence[Int[Tensor, "batch pos"]],
    sinks: Sequence[Bool[Tensor, "batch pos"]],
    fwd_hooks: list,
) -> tuple[Float[Tensor, "n_layers n_heads"], int]:
    cfg = model.cfg
    total = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    current: dict[str, Tensor] = {}

    def add(pattern: Float[Tensor, "batch head q k"], hook: HookPoint, layer: int) -> None:
        sink, queries = current["sink"], current["queries"]
        on_sink = einsum(pattern.float(), sink.float(), "batch head q k, batch k -> batch head q")
        total[layer] += (
            einsum(on_sink, queries.float(), "batch head q, batch q -> head").double().cpu()
        )

    hooks = [
        (hook_pattern(layer), lambda p, hook, i=layer: add(p, hook, i))
        for layer in range(cfg.n_layers)
    ]
    n_queries = 0
    with torch.inference_mode(), model.hooks(fwd_hooks=[*fwd_hooks, *hooks]):
        for ids, sink in zip(batches, sinks, strict=True):
            sink = sink.to(ids.device)
            # Queries after a sink token, not on one: causal attention can reach the sink.
            queries = ~sink & (sink.cumsum(-1) > 0)
            current.update(sink=sink, queries=queries)
            n_queries += int(queries.sum())
            model(ids, return_type=None)
    if n_queries == 0:
        raise SwLensError("no token comes after a super-activation token: no sink to map")
    return (total / n_queries).float(), n_queries


def sink_map(
    model: TransformerBridge,
    batches: Sequence[Int[Tensor, "batch pos"]],
    coords: Sequence[WeightCoord],
    fraction: float,
) -> SinkMap:
    """The attention-sink map of `batches` (token ids, each [batch, pos]), the sink tokens
    found from the first of `coords` (the strongest super weight) and all of `coords`
    zeroed together for the comparison."""
    values = super_activation(model, batches, coords[0])
    sinks = sink_masks(values, fraction)
    clean, n_queries = _mass(model, batches, sinks, [])
    zeroed, _ = _mass(model, batches, sinks, ablation_hooks(model, coords))
    positions = [row.nonzero().flatten().tolist() for sink in sinks for row in sink]
    peaks = [int(row.abs().argmax()) for batch in values for row in batch]
    return SinkMap(n_queries, positions, peaks, clean, zeroed)


def head_patterns(
    model: TransformerBridge,
    ids: Int[Tensor, "1 pos"],
    heads: Sequence[tuple[int, int]],
    coords: Sequence[WeightCoord],
) -> tuple[Float[Tensor, "n pos pos"], Float[Tensor, "n pos pos"]]:
    """The attention patterns of `heads` ((layer, head) pairs) on one text, clean and with
    `coords` zeroed: what the attention pages show."""
    patterns = []
    for fwd_hooks in ([], ablation_hooks(model, coords)):
        kept: dict[tuple[int, int], Tensor] = {}

        def keep(
            pattern: Float[Tensor, "batch head q k"], hook: HookPoint, layer: int, kept=kept
        ) -> None:
            for at, head in heads:
                if at == layer:
                    kept[at, head] = pattern[0, head].float().cpu()

        layers = sorted({layer for layer, _ in heads})
        hooks = [
            (hook_pattern(layer), lambda p, hook, i=layer: keep(p, hook, i)) for layer in layers
        ]
        with torch.inference_mode(), model.hooks(fwd_hooks=[*fwd_hooks, *hooks]):
            model(ids, return_type=None)
        patterns.append(torch.stack([kept[h] for h in heads]))
    return patterns[0], patterns[1]
