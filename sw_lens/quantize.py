"""Round-to-nearest weight quantization, with and without the super weight (paper, Sec. 5).

The paper's claim: a super weight stretches its block's range, so plain round-to-nearest
(RTN) with large blocks rounds every other weight of the block to a few levels; clipping
outliers fixes the range but destroys the super weight; clipping *and* keeping the super
weight in full precision (restored after quantization) gets both, and lets RTN use much
larger blocks.

Asymmetric RTN at `bits` over blocks of `block_size` consecutive elements of the stored
HF parameter (``down_proj.weight`` [out, in], row-major; the whole tensor when
`block_size` is None): per block, ``scale = (max - min) / (2**bits - 1)``, integer zero
point ``z = round(-min / scale)``, ``q = clamp(round(w / scale) + z, 0, 2**bits - 1)``,
``w' = (q - z) * scale``. Every weight in ``[min, max]`` is then within ``scale / 2`` of
``w'``. Arithmetic is in float32 whatever the model's dtype.

`quantized` writes the dequantized weights into the model for the duration of a block
and restores the saved originals bit-for-bit on exit, whatever happened inside; a model
streamed from its checkpoint gets them as each layer is read (`quantized_perplexity`).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import SwLensError
from sw_lens.patching import by_layer, check_coords
from sw_lens.perplexity import PerplexityResult, Protocol, evaluate
from sw_lens.placement import resident
from sw_lens.stream import StreamedModel, check_streamed_coords, evaluate_edited
from sw_lens.vocabulary import WeightCoord, down_proj_parameter, stored_index

METHODS = ("plain", "clipped", "clipped + super weight")
CLIPS = ("zscore", "percentile")


@dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int | None  # None: one block per tensor
    method: str = "plain"  # one of METHODS
    clip: str = "zscore"  # how outliers are clipped, for the clipped methods
    clip_value: float = 4.0  # z-score, or percentile of |w| (e.g. 99.99)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise SwLensError(f"bits must be between 2 and 16, got {self.bits}")
        if self.block_size is not None and self.block_size < 2:
            raise SwLensError(f"block size must be at least 2, got {self.block_size}")
        if self.method not in METHODS:
            raise SwLensError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.clip not in CLIPS:
            raise SwLensError(f"unknown clip {self.clip!r}; known: {', '.join(CLIPS)}")
        if self.clip == "percentile" and not 0 < self.clip_value < 100:
            raise SwLensError(f"a percentile must be in (0, 100), got {self.clip_value}")
        if self.clip == "zscore" and self.clip_value <= 0:
            raise SwLensError(f"a z-score must be positive, got {self.clip_value}")

    def describe(self) -> str:
        block = "tensor" if self.block_size is None else f"block {self.block_size}"
        clip = "" if self.method == "plain" else f", clip {self.clip} {self.clip_value:g}"
        return f"{self.bits}-bit RTN, {block}, {self.method}{clip}"


def rtn(
    weight: Float[Tensor, "..."], bits: int, block_size: int | None
) -> tuple[Float[Tensor, "..."], Float[Tensor, "n_blocks"]]:
    """Quantize-dequantize `weight` (asymmetric RTN, see the module docstring); returns the
    dequantized tensor in `weight`'s dtype and each block's scale."""
    flat = weight.detach().float().flatten()
    size = block_size or flat.numel()
    padding = -flat.numel() % size
    # Repeating the last element leaves the last block's min and max unchanged.
    blocks = F.pad(flat[None], (0, padding), mode="replicate")[0].view(-1, size)
    low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(blocks / scale) + zero, 0, levels)
    dequantized = ((q - zero) * scale).flatten()[: flat.numel()]
    return dequantized.view_as(weight).to(weight.dtype), scale.flatten()


def clip(weight: Float[Tensor, "..."], method: str, value: float) -> Float[Tensor, "..."]:
    """Clip outliers: to mean +- `value` std (zscore), or to +-the `value`-th percentile of
    |w| (percentile). Statistics are over the whole tensor."""
    w = weight.detach().float()
    if method == "zscore":
        mean, std = w.mean(), w.std()
        low, high = mean - value * std, mean + value * std
    else:
        # torch.quantile is limited to 2**24 elements; kthvalue is not.
        k = max(1, min(w.numel(), round(value / 100 * w.numel())))
        high = w.abs().flatten().kthvalue(k).values
        low = -high
    return w.clamp(low, high).to(weight.dtype)


def quantize_weight(
    weight: Float[Tensor, "..."], scheme: Scheme, keep: Sequence[tuple[int, int]] = ()
) -> Float[Tensor, "..."]:
    """`weight` quantized-dequantized by `scheme`; with the "clipped + super weight" method
    the entries at `keep` (indices into `weight`) get their original values back."""
    source = weight if scheme.method == "plain" else clip(weight, scheme.clip, scheme.clip_value)
    dequantized, _ = rtn(source, scheme.bits, scheme.block_size)
    if scheme.method == "clipped + super weight":
        for index in keep:
            dequantized[index] = weight.detach()[index]
    return dequantized


def hf_parameters(model: TransformerBridge) -> dict[str, torch.nn.Parameter]:
    """The HF model's parameters by their HF names (the bridge wraps each HF module as
    ``_original_component``)."""
    return {
        name.replace("._original_component", ""): p
        for name, p in model.original_model.named_parameters()
    }


def target_parameters(model: TransformerBridge, all_linear: bool) -> list[str]:
    """HF parameter names to quantize: every layer's down-projection, or with
    `all_linear` every 2-D weight inside the decoder layers (attention and MLP)."""
    names = [down_proj_parameter(model, layer)[0] for layer in range(model.cfg.n_layers)]
    if not all_linear:
        return names
    layers = names[0].rsplit(".0.", 1)[0] + "."  # e.g. "model.layers." or "transformer.h."
    return [
        name for name, p in hf_parameters(model).items() if p.ndim == 2 and name.startswith(layers)
    ]


@contextmanager
def quantized(
    model: TransformerBridge,
    scheme: Scheme,
    super_weights: Sequence[WeightCoord] = (),
    all_linear: bool = False,
) -> Iterator[list[str]]:
    """Write `scheme`'s dequantized weights into the model's down-projections (or all its
    decoder linear layers) while the block runs; yields the parameter names. The
    originals are restored bit-for-bit on exit, also on an exception or Ctrl-C. Where a
    device map offloads decoder layers, they stay loaded while the block runs."""
    check_coords(model, super_weights)
    names = target_parameters(model, all_linear)
    keep: dict[str, list[tuple[int, int]]] = {}
    for layer, coords in by_layer(super_weights).items():
        name, transposed = down_proj_parameter(model, layer)
        keep[name] = [(c.row, c.col) if transposed else (c.col, c.row) for c in coords]
    with ExitStack() as stack:
        for block in model.blocks:
            stack.enter_context(resident(block))
        every = hf_parameters(model)
        params = {name: every[name] for name in names}
        saved = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(quantize_weight(saved[name], scheme, keep.get(name, ())))
            yield names
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])


def quantized_perplexity(
    model: TransformerBridge | StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    scheme: Scheme | None,
    super_weights: Sequence[WeightCoord] = (),
    all_linear: bool = False,
) -> tuple[PerplexityResult, int]:
    """Perplexity with `scheme` applied (None: the unquantized model) and how many
    parameters it quantized: written into a model in memory (`quantized`), or applied to
    each tensor as a streamed model reads its layer."""
    desc = scheme.describe() if scheme else "baseline"
    if isinstance(model, TransformerBridge):
        if scheme is None:
            return evaluate(model, tokens, protocol, corpus, desc=desc), 0
        with quantized(model, scheme, super_weights, all_linear) as names:
            return evaluate(model, tokens, protocol, corpus, desc=desc), len(names)
    edits = {} if scheme is None else _streamed_edits(model, scheme, super_weights, all_linear)
    return evaluate_edited(model, tokens, protocol, corpus, edits, desc), len(edits)


def _streamed_edits(
    model: StreamedModel, scheme: Scheme, super_weights: Sequence[WeightCoord], all_linear: bool
) -> dict[str, Callable[[Tensor], Tensor]]:
    """`quantized`'s parameters and their quantization, as edits of a streamed model."""
    check_streamed_coords(model, super_weights)
    keep: dict[str, list[tuple[int, int]]] = {}
    for c in super_weights:
        linear = isinstance(model.down_proj[c.layer], nn.Linear)
        keep.setdefault(model.down_proj_name(c.layer), []).append(stored_index(c, linear))
    names = [model.down_proj_name(layer) for layer in range(model.n_layers)]
    if all_linear:
        names = [
            f"{model.prefix}{index}.{name}"
            for index, layer in enumerate(model.layers)
            for name, p in layer.named_parameters()
            if p.ndim == 2
        ]
    return {
        name: (lambda tensor, name=name: quantize_weight(tensor, scheme, keep.get(name, ())))
        for name in names
    }
