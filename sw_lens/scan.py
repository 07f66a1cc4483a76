"""Per-layer spikes of the down-projection's input and output.

For every layer we record the largest |value| of ``blocks.{l}.mlp.hook_post`` (the
down-projection input, d_mlp channels) and of ``blocks.{l}.mlp.out.hook_out`` (its own
output, d_model channels), with the text, position, token and channel where it occurs. A
super weight shows up as an input spike at channel ``col`` and an output spike at
channel ``row`` on the same token (paper, Sec. 3.1). The output is read before any norm
that an architecture puts after the MLP (Gemma 2 and 3, OLMo 2): there
``blocks.{l}.hook_mlp_out`` is that norm's output (on a real Gemma-family model 2,862.8
where the down-projection wrote 28.58) and elsewhere the same tensor.

`scan` reduces inside the hooks, so memory holds one layer's activation at a time, never
the whole cache; `scan_with_cache` goes through ``run_with_cache`` for users who want the
raw tensors and gives the same result.

Each output spike also carries the residual stream entering the MLP
(``hook_resid_mid``) and what the MLP adds to it (``hook_mlp_out``, after any post-MLP
norm) at that token and channel: an MLP that *cancels* a massive activation
(|resid + added| < |resid|) meets the spike rule as well as one that creates it.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.patching import by_layer, weight_value
from sw_lens.progress import bar
from sw_lens.vocabulary import WeightCoord, hook_down_out, hook_mlp_out, hook_post, hook_resid_mid


@dataclass
class Spike:
    """The largest |activation| of one hook over all scanned tokens, and where it sits."""

    hook: str
    value: float  # signed
    text: int  # index of the text in the scanned batch
    pos: int
    channel: int
    token: str

    @property
    def magnitude(self) -> float:
        return abs(self.value)


@dataclass
class LayerSpikes:
    layer: int
    post: Spike  # down-projection input, channel in d_mlp
    mlp_out: Spike  # down-projection output, channel in d_model
    resid_mid: float | None  # residual entering the MLP at mlp_out's token and channel
    added: float | None = None  # what the MLP adds to the residual there (hook_mlp_out)

    @property
    def cancels(self) -> bool:
        """The MLP output shrinks the residual stream at its spike instead of growing it."""
        if self.resid_mid is None or self.added is None:
            return False
        return abs(self.resid_mid + self.added) < abs(self.resid_mid)


@dataclass
class ScanResult:
    layers: list[LayerSpikes]
    prepend_bos: bool
    n_texts: int
    n_tokens: int


def _check_finite(act: Tensor, name: str) -> None:
    """inf/NaN at the first hook where it appears, with the likely cause: in a 16-bit
    dtype a super activation overflowing, in float32 non-finite weights in the file."""
    if torch.isfinite(act).all():
        return
    cause = (
        "the super activation overflowed; use --dtype bfloat16 or float32"
        if act.dtype in (torch.float16, torch.bfloat16)
        else "the checkpoint's weights up to this layer hold inf/NaN, or it overflows float32"
    )
    raise NonFiniteActivation(
        f"{name} has inf/NaN values in {act.dtype} (first layer where it happens): {cause}"
    )


def _max_abs(act: Float[Tensor, "pos channel"]) -> tuple[float, int, int]:
    flat = int(act.abs().argmax())
    pos, channel = divmod(flat, act.shape[-1])
    return float(act[pos, channel]), pos, channel


def _token(tokenizer: PreTrainedTokenizerBase, ids: Int[Tensor, "pos"], pos: int) -> str:
    return tokenizer.decode([int(ids[pos])])


class SpikeReducer:
    """Running per-layer maxima over texts, fed one layer's activation at a time (by a
    bridge's hooks, or by module hooks on a model run layer by layer: it needs only the
    layer count and the tokenizer that names a spike's token)."""

    def __init__(self, n_layers: int, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        n = n_layers
        self.post: list[Spike | None] = [None] * n
        self.out: list[Spike | None] = [None] * n
        self.resid: list[float | None] = [None] * n
        self.added: list[float | None] = [None] * n

    def update(
        self,
        layer: int,
        text: int,
        ids: Int[Tensor, "pos"],
        post: Float[Tensor, "pos d_mlp"] | None = None,
        mlp_out: Float[Tensor, "pos d_model"] | None = None,
        resid_mid: Float[Tensor, "pos d_model"] | None = None,
        added: Float[Tensor, "pos d_model"] | None = None,
        offset: int = 0,
    ) -> None:
        """Fold in one layer's activations of text `text` at positions ``offset..`` (the
        whole text, or a chunk of it): `mlp_out` is the down-projection's own output,
        `added` what the MLP adds to the residual stream (`mlp_out` unless a norm
        follows the MLP)."""
        if post is not None:
            spike = self._beats(self.post[layer], hook_post(layer), post, text, ids, offset)
            self.post[layer] = spike or self.post[layer]
        if mlp_out is not None:
            spike = self._beats(self.out[layer], hook_down_out(layer), mlp_out, text, ids, offset)
            if spike is not None:
                self.out[layer] = spike
                at = (spike.pos - offset, spike.channel)
                self.resid[layer] = None if resid_mid is None else float(resid_mid[at])
                self.added[layer] = float((mlp_out if added is None else added)[at])

    def _beats(
        self,
        best: Spike | None,
        hook: str,
        act: Float[Tensor, "pos channel"],
        text: int,
        ids,
        offset: int,
    ) -> Spike | None:
        """This activation's spike if it is larger than `best` (earlier positions and
        texts win ties)."""
        _check_finite(act, hook)
        value, pos, channel = _max_abs(act)
        if best is not None and abs(value) <= best.magnitude:
            return None
        return Spike(
            hook, value, text, offset + pos, channel, _token(self.tokenizer, ids, offset + pos)
        )

    def result(self, prepend_bos: bool, texts: Sequence[Tensor]) -> ScanResult:
        layers = [
            LayerSpikes(layer, post, out, resid, added)
            for layer, (post, out, resid, added) in enumerate(
                zip(self.post, self.out, self.resid, self.added, strict=True)
            )
        ]
        n_tokens = sum(len(t) for t in texts)
        return ScanResult(layers, prepend_bos, len(texts), n_tokens)


def check_texts(texts: Sequence[Tensor]) -> None:
    if not texts or any(len(t) == 0 for t in texts):
        raise SwLensError("nothing to scan: every text needs at least one token")


def scan(
    model: TransformerBridge,
    texts: Sequence[Int[Tensor, "pos"]],
    prepend_bos: bool,
    fwd_hooks: Sequence = (),
) -> ScanResult:
    """Scan token sequences (BOS already prepended where the protocol wants it; the flag
    is recorded) with `fwd_hooks` active, e.g. ablations from `patching`."""
    check_texts(texts)
    reducer = SpikeReducer(model.cfg.n_layers, model.tokenizer)
    has_resid_mid = hook_resid_mid(0) in model.hook_dict
    for text, ids in enumerate(texts if len(texts) < 8 else bar(texts, desc="scan", unit="text")):
        # Ablations first: the reducer must see their effect.
        hooks = [*fwd_hooks, *_reducer_hooks(reducer, text, ids, has_resid_mid)]
        with torch.inference_mode(), contextlib.suppress(_ScanDone):
            model.run_with_hooks(ids[None].to(model.cfg.device), fwd_hooks=hooks, return_type=None)
    return reducer.result(prepend_bos, texts)


class _ScanDone(Exception):
    """Raised after the last layer's hook_mlp_out (which follows the down-projection's
    own output): the final norm and the unembedding (a [pos, d_vocab] tensor, often the
    largest of the forward) are never computed."""


def _reducer_hooks(reducer: SpikeReducer, text: int, ids: Tensor, has_resid_mid: bool) -> list:
    """Hooks feeding one text's activations to `reducer`, one layer at a time.

    The layer is bound as a default argument: inside a hook, `hook.name` can be the
    canonical name (``mlp.out.hook_in``) rather than the alias we registered."""
    kept: dict[tuple[str, int], Tensor] = {}
    hooks = []
    for layer in range(len(reducer.post)):

        def keep(act, hook, key):
            kept[key] = act[0]

        def on_post(act, hook, layer=layer):
            reducer.update(layer, text, ids, post=act[0])

        def on_mlp_out(act, hook, layer=layer):
            down_out = kept.pop(("down_out", layer))
            resid = kept.pop(("resid_mid", layer), None)
            reducer.update(layer, text, ids, mlp_out=down_out, resid_mid=resid, added=act[0])
            if layer == len(reducer.post) - 1:
                raise _ScanDone

        if has_resid_mid:
            hooks.append((hook_resid_mid(layer), partial(keep, key=("resid_mid", layer))))
        hooks += [
            (hook_post(layer), on_post),
            (hook_down_out(layer), partial(keep, key=("down_out", layer))),
            (hook_mlp_out(layer), on_mlp_out),
        ]
    return hooks


def scan_with_cache(
    model: TransformerBridge, texts: Sequence[Int[Tensor, "pos"]], prepend_bos: bool
) -> tuple[ScanResult, list[ActivationCache]]:
    """`scan` through ``run_with_cache``: same result, plus every text's cache of
    ``hook_post``, the down-projection's output, ``hook_mlp_out`` and ``hook_resid_mid``
    (memory grows with layers x tokens; use `scan` for long inputs)."""
    check_texts(texts)
    reducer = SpikeReducer(model.cfg.n_layers, model.tokenizer)
    names = {
        name(layer)
        for layer in range(model.cfg.n_layers)
        for name in (hook_post, hook_down_out, hook_mlp_out, hook_resid_mid)
    }
    caches = []
    for text, ids in enumerate(texts):
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                ids[None].to(model.cfg.device), names_filter=names.__contains__
            )
        for layer in range(model.cfg.n_layers):
            resid = cache[hook_resid_mid(layer)][0] if hook_resid_mid(layer) in cache else None
            reducer.update(
                layer,
                text,
                ids,
                post=cache[hook_post(layer)][0],
                mlp_out=cache[hook_down_out(layer)][0],
                resid_mid=resid,
                added=cache[hook_mlp_out(layer)][0],
            )
        caches.append(cache)
    return reducer.result(prepend_bos, texts), caches


@dataclass(frozen=True)
class ColumnMax:
    """A weight's output row and its own share of it, on one text."""

    value: float  # the down-projection output's signed largest |value| in `row`
    pos: int  # ... at this position
    post: float  # hook_post[pos, col]: the weight's input at that position
    contribution: float  # the signed largest |hook_post[:, col] * W[row, col]| over the text


def column_maxima(
    model: TransformerBridge, ids: Int[Tensor, "pos"], coords: Sequence[WeightCoord]
) -> dict[WeightCoord, ColumnMax]:
    """Per weight: its output row's largest value on `ids`, where it is, the weight's input
    there, and the weight's own largest contribution (which, unlike the row's value,
    differs between weights of one row)."""
    found: dict[WeightCoord, ColumnMax] = {}
    posts: dict[int, Tensor] = {}
    hooks = []
    for layer, layer_coords in by_layer(coords).items():

        def keep_post(post: Float[Tensor, "1 pos d_mlp"], hook, layer=layer) -> None:
            posts[layer] = post[0]

        def measure(out: Float[Tensor, "1 pos d_model"], hook, layer=layer, cs=layer_coords):
            for c in cs:
                pos = int(out[0, :, c.row].abs().argmax())
                contribution = posts[layer][:, c.col] * weight_value(model, c)
                found[c] = ColumnMax(
                    float(out[0, pos, c.row]),
                    pos,
                    float(posts[layer][pos, c.col]),
                    float(contribution[contribution.abs().argmax()]),
                )

        hooks += [(hook_post(layer), keep_post), (hook_down_out(layer), measure)]
    with torch.inference_mode():
        model.run_with_hooks(ids[None].to(model.cfg.device), fwd_hooks=hooks, return_type=None)
    return found


def weight_spikes(
    model: TransformerBridge, texts: Sequence[Int[Tensor, "pos"]], coord: WeightCoord
) -> tuple[Spike, Spike]:
    """A weight's input and output on `texts`, where its output is largest: the
    ``hook_post`` value of its column and the down-projection output of its row at the
    token where that is largest in magnitude (its super activation)."""
    best = None
    for text, ids in enumerate(texts):
        seen = column_maxima(model, ids, [coord])[coord]
        if best is None or abs(seen.value) > abs(best[0]):
            best = (seen.value, seen.pos, seen.post, text)
    value, pos, post, text = best
    token = _token(model.tokenizer, texts[text], pos)
    return (
        Spike(hook_post(coord.layer), post, text, pos, coord.col, token),
        Spike(hook_down_out(coord.layer), value, text, pos, coord.row, token),
    )


@dataclass
class LayerActivations:
    """One layer's down-projection input and output on one text, at its top channels."""

    layer: int
    tokens: list[str]
    post_channels: list[int]  # hook_post channels, largest max |value| first
    post: list[list[float]]  # [pos][channel]
    mlp_out_channels: list[int]  # of the down-projection's own output
    mlp_out: list[list[float]]


def layer_activations(
    model: TransformerBridge, ids: Int[Tensor, "pos"], layer: int, top_k: int = 16
) -> LayerActivations:
    """The `top_k` channels of each hook by max |value| over the text, for a heatmap that
    shows whether a super activation sits on one channel at a few tokens."""
    names = [hook_post(layer), hook_down_out(layer)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            ids[None].to(model.cfg.device), names_filter=names.__contains__
        )
    top = {}
    for name in names:
        act: Float[Tensor, "pos channel"] = cache[name][0].float().cpu()
        channels = act.abs().amax(0).topk(min(top_k, act.shape[-1])).indices
        top[name] = (channels.tolist(), act[:, channels].tolist())
    return LayerActivations(
        layer=layer,
        tokens=[_token(model.tokenizer, ids, pos) for pos in range(len(ids))],
        post_channels=top[names[0]][0],
        post=top[names[0]][1],
        mlp_out_channels=top[names[1]][0],
        mlp_out=top[names[1]][1],
    )
