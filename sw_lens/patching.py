"""Zeroing or scaling single down-projection weights, by hooks or by an in-place edit.

Coordinates are HF's: ``down_proj.weight[row, col]`` with ``row`` the output channel
(d_model) and ``col`` the input channel (d_mlp), i.e. TransformerLens
``blocks[layer].mlp.W_out[col, row]``.

`ablation_hooks` leaves the parameters untouched: the hook on ``hook_post`` keeps the
down-projection input, and the hook on the down-projection's own output
(``mlp.out.hook_out``; the same as ``hook_mlp_out`` unless an architecture normalises
after the MLP) recomputes each affected output channel ``row`` from it with the edited
column ``W_out[:, row]`` (plus ``b_out[row]`` where the model has one). Recomputing
rather than subtracting ``w * post[..., col]`` matters: a super weight's product is
~1e3-1e4, and subtracting it from an output of the same size leaves float32 rounding of
~1e-4 where the edited model has ~1e-7. Users can pass the list to ``run_with_hooks`` /
``model.hooks(...)`` in their own analyses.
`edited_weights` writes into ``W_out`` (a view of the HF weight) and restores the saved
values bit-for-bit on exit, also when the body raises. Where a device map offloads a
layer, its weights stay loaded for the block and the stored copy is never written.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import SwLensError
from sw_lens.vocabulary import WeightCoord, b_out, hook_down_out, hook_post, w_out

FwdHook = tuple[str, Callable]


def check_coords(model: TransformerBridge, coords: Iterable[WeightCoord]) -> None:
    """One-line error for a coordinate outside the model."""
    cfg = model.cfg
    for c in coords:
        if not 0 <= c.layer < cfg.n_layers:
            raise SwLensError(f"{c}: layer out of range, the model has {cfg.n_layers} layers")
        if not 0 <= c.row < cfg.d_model:
            raise SwLensError(f"{c}: row out of range, d_model is {cfg.d_model}")
        if not 0 <= c.col < cfg.d_mlp:
            raise SwLensError(f"{c}: col out of range, d_mlp is {cfg.d_mlp}")


def weight_value(model: TransformerBridge, coord: WeightCoord) -> float:
    with w_out(model, coord.layer) as weight:
        return float(weight.detach()[coord.col, coord.row])


def by_layer(coords: Iterable[WeightCoord]) -> dict[int, list[WeightCoord]]:
    grouped: dict[int, list[WeightCoord]] = defaultdict(list)
    for c in sorted(set(coords)):
        grouped[c.layer].append(c)
    return dict(grouped)


# (layer, row) -> |value| at or above which output channel `row` keeps its unablated value
Restore = Mapping[tuple[int, int], float]


class EditedColumns:
    """The output channels of one layer's down-projection that an edit touches, recomputed
    from its input with the edited columns of ``W_out`` (snapshot when built).

    With `restore_above` (row -> threshold), a channel keeps its unablated value wherever
    that value's magnitude reaches the threshold: the paper's "restore the super
    activation" with the super weight zeroed. The unablated value is the module's own
    output, exact, because the down-projection's input does not depend on its weights.
    `n_restored` counts the restored (position, channel) entries."""

    def __init__(
        self,
        weight: Float[Tensor, "d_mlp d_model"],
        bias: Float[Tensor, "d_model"] | None,
        coords: list[WeightCoord],
        scale: float,
        restore_above: Mapping[int, float] | None = None,
    ):
        """`weight` and `bias`: the layer's ``W_out`` and ``b_out`` (copied here)."""
        rows = sorted({c.row for c in coords})
        index = {row: i for i, row in enumerate(rows)}
        self.columns: Float[Tensor, "d_mlp n_rows"] = weight.detach()[:, rows].clone()
        self.bias = None if bias is None else bias.detach()[rows].clone()
        for c in coords:
            self.columns[c.col, index[c.row]] *= scale
        self.rows = torch.tensor(rows, device=self.columns.device)
        restore_above = restore_above or {}
        self.thresholds = (
            torch.tensor([restore_above.get(r, math.inf) for r in rows], device=self.rows.device)
            if restore_above
            else None
        )
        self.n_restored = 0

    def apply(
        self, post: Float[Tensor, "batch pos d_mlp"], out: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        recomputed = einsum(
            post, self.columns.to(post.dtype), "batch pos d_mlp, d_mlp n_rows -> batch pos n_rows"
        )
        if self.bias is not None:
            recomputed = recomputed + self.bias.to(recomputed.dtype)
        recomputed = recomputed.to(out.dtype)
        if self.thresholds is not None:
            original = out[..., self.rows]
            massive = original.abs() >= self.thresholds.to(original.dtype)
            self.n_restored += int(massive.sum())
            recomputed = torch.where(massive, original, recomputed)
        return out.index_copy(-1, self.rows, recomputed)


def column_edits(
    model: TransformerBridge,
    coords: Iterable[WeightCoord],
    scale: float = 0.0,
    restore_above: Restore | None = None,
) -> dict[int, EditedColumns]:
    """Per layer, the edit that multiplies each weight in `coords` by `scale`. Weight
    values are read now, so build edits from the unedited model."""
    coords = list(coords)
    check_coords(model, coords)
    edits = {}
    for layer, layer_coords in by_layer(coords).items():
        with w_out(model, layer) as weight:
            edits[layer] = EditedColumns(
                weight, b_out(model, layer), layer_coords, scale, rows_of(restore_above, layer)
            )
    return edits


def rows_of(restore_above: Restore | None, layer: int) -> dict[int, float]:
    """`restore_above`'s thresholds of one layer, by output channel."""
    return {row: t for (at, row), t in (restore_above or {}).items() if at == layer}


def ablation_hooks(
    model: TransformerBridge,
    coords: Iterable[WeightCoord],
    scale: float = 0.0,
    restore_above: Restore | None = None,
) -> list[FwdHook]:
    """Forward hooks that act as if each weight in `coords` were multiplied by `scale`
    (0 zeroes it); see `EditedColumns` for `restore_above`."""
    return edit_hooks(column_edits(model, coords, scale, restore_above))


def edit_hooks(edits: Mapping[int, EditedColumns]) -> list[FwdHook]:
    """TransformerLens hooks applying `edits` (from `column_edits`)."""
    hooks: list[FwdHook] = []
    for layer, edit in edits.items():
        kept: dict[str, Tensor] = {}

        def keep_post(post: Float[Tensor, "batch pos d_mlp"], hook: HookPoint, kept=kept) -> None:
            kept["post"] = post

        def patch(out: Float[Tensor, "batch pos d_model"], hook: HookPoint, kept=kept, edit=edit):
            return edit.apply(kept.pop("post"), out)

        # Bound by default arguments: inside a hook, `hook.name` may be the canonical name
        # (`mlp.out.hook_in`) rather than the alias registered here.
        hooks += [
            (hook_post(layer), keep_post),
            (hook_down_out(layer), patch),
        ]
    return hooks


@contextmanager
def edited_weights(
    model: TransformerBridge, coords: Iterable[WeightCoord], scale: float = 0.0
) -> Iterator[None]:
    """Multiply each weight in `coords` by `scale` in place for the duration of the block;
    the original values are written back bit-for-bit on exit, whatever happened inside."""
    coords = sorted(set(coords))
    check_coords(model, coords)
    with ExitStack() as stack:
        weights = {
            layer: stack.enter_context(w_out(model, layer)) for layer in {c.layer for c in coords}
        }
        saved = [(c, weights[c.layer][c.col, c.row].clone()) for c in coords]
        try:
            with torch.no_grad():
                for c, value in saved:
                    weights[c.layer][c.col, c.row] = value * scale
            yield
        finally:
            with torch.no_grad():
                for c, value in saved:
                    weights[c.layer][c.col, c.row] = value
