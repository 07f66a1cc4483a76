"""Which components carry a super weight's effect: activation patching, exact and by
attribution.

A *component* is one attention head (its output before the output projection,
TransformerLens ``blocks.{l}.attn.hook_z[:, :, h]``) or one MLP (``blocks.{l}.hook_mlp_out``).
Two runs frame the question: *clean* (the model as it is) and *zeroed* (the super
weights zeroed). Exact patching reruns with one component's output swapped:

- denoising: the zeroed run with the component's clean output restored; the fraction
  of the loss increase it *recovers* is ``(L_zeroed - L_patched) / (L_zeroed - L_clean)``;
- noising: the clean run with the component's zeroed output; the fraction of the
  increase it *reproduces* is ``(L_patched - L_clean) / (L_zeroed - L_clean)``.

Attribution patching (Nanda, 2023; Syed et al., 2023) estimates every denoising patch at
once from one forward and one backward pass of the zeroed run:
``L_patched - L_zeroed ~ (a_clean - a_zeroed) . dL/da``.

Components below the earliest zeroed layer see the same input in both runs and are not
patched (their effect is exactly zero), and neither are the heads of that layer. Every
patched run starts at the component's own layer from the residual stream the clean or
zeroed run kept there (`fast.Resume`): a component of layer l costs (n - l) / n of a
pass. Runs use the HF twin, whose output projection's input is every head's z
concatenated head by head (``hook_z`` flattened); the tests check the patched losses
against the bridge's own ``hook_z`` and ``hook_mlp_out`` hooks.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from einops import einsum
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from sw_lens import progress
from sw_lens.errors import NonFiniteActivation
from sw_lens.fast import Resume, frozen_parameters, twin_ablation, twin_module
from sw_lens.patching import column_edits
from sw_lens.perplexity import Protocol, Window, batches_on, scored_nll
from sw_lens.vocabulary import WeightCoord, hook_mlp_out, hook_z


@dataclass(frozen=True)
class Component:
    layer: int
    head: int | None = None  # None: the layer's MLP

    def order(self) -> tuple[int, float]:
        """In the order the model computes them: a layer's heads, then its MLP."""
        return self.layer, math.inf if self.head is None else self.head

    @property
    def name(self) -> str:
        """Where a TransformerLens user finds it."""
        if self.head is None:
            return hook_mlp_out(self.layer)
        return f"{hook_z(self.layer)}[:, :, {self.head}]"

    def __str__(self) -> str:
        return f"L{self.layer} MLP" if self.head is None else f"L{self.layer} H{self.head}"


def components(model: TransformerBridge, coords: Sequence[WeightCoord]) -> list[Component]:
    """Every component whose output can differ between the clean and the zeroed run: the
    MLPs from the earliest zeroed layer on, the heads after it."""
    first, cfg = min(c.layer for c in coords), model.cfg
    return [
        Component(layer, head)
        for layer in range(first, cfg.n_layers)
        for head in [*(range(cfg.n_heads) if layer > first else []), None]
    ]


class _Sites:
    """The twin's modules whose outputs are the components: the attention's output
    projection (its input holds each head's z) and the MLP."""

    def __init__(self, model: TransformerBridge, twin: nn.Module, parts: Sequence[Component]):
        self.d_head = model.cfg.d_head
        layers = sorted({c.layer for c in parts})
        self.o = {i: twin_module(model, twin, model.blocks[i].attn.o) for i in layers}
        self.mlp = {i: twin_module(model, twin, model.blocks[i].mlp) for i in layers}

    def _slice(self, c: Component) -> slice:
        return slice(c.head * self.d_head, (c.head + 1) * self.d_head)

    def read(self, c: Component, value: Tensor) -> Tensor:
        """The component's part of its site's tensor."""
        return value if c.head is None else value[..., self._slice(c)]

    @contextmanager
    def recording(self) -> Iterator[dict[tuple[str, int], Tensor]]:
        """Each site's tensor of the next forward: ("z", l) the output projection's input,
        ("mlp", l) the MLP's output."""
        kept: dict[tuple[str, int], Tensor] = {}
        with ExitStack() as stack:
            for layer, module in self.o.items():
                handle = module.register_forward_pre_hook(
                    lambda mod, args, i=layer: kept.__setitem__(("z", i), args[0])
                )
                stack.callback(handle.remove)
            for layer, module in self.mlp.items():
                handle = module.register_forward_hook(
                    lambda mod, args, out, i=layer: kept.__setitem__(("mlp", i), out)
                )
                stack.callback(handle.remove)
            yield kept

    @contextmanager
    def patched(self, c: Component, source: dict[tuple[str, int], Tensor]) -> Iterator[None]:
        """While the block runs, component `c` outputs its value in `source`."""
        if c.head is None:
            value = source["mlp", c.layer]
            handle = self.mlp[c.layer].register_forward_hook(lambda mod, args, out: value)
        else:
            value, at = source["z", c.layer], self._slice(c)

            def swap(mod, args):
                z = args[0].clone()
                z[..., at] = value[..., at]
                return (z, *args[1:])

            handle = self.o[c.layer].register_forward_pre_hook(swap)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class Mediation:
    """Losses (mean NLL per scored token, nats) of the clean and zeroed runs and of each
    patched run, on the same windows."""

    protocol: Protocol
    n_tokens: int
    clean: float
    zeroed: float
    denoised: dict[Component, float] = field(default_factory=dict)
    noised: dict[Component, float] = field(default_factory=dict)
    # Attribution patching's estimate of L_denoised - L_zeroed:
    attribution: dict[Component, float] = field(default_factory=dict)
    passes: float = 0.0  # layers run / n_layers, summed over every forward pass

    @property
    def increase(self) -> float:
        return self.zeroed - self.clean

    def recovered(self, c: Component) -> float:
        return (self.zeroed - self.denoised[c]) / self.increase

    def reproduced(self, c: Component) -> float:
        return (self.noised[c] - self.clean) / self.increase

    def estimated(self, c: Component) -> float:
        """Attribution patching's estimate of `recovered`."""
        return -self.attribution[c] / self.increase


def _check_finite(losses: Tensor, what: str) -> Tensor:
    if not torch.isfinite(losses).all():
        raise NonFiniteActivation(f"the {what} run's loss is NaN or infinite: use --dtype float32")
    return losses


def _key(c: Component) -> tuple[str, int]:
    return ("mlp" if c.head is None else "z", c.layer)


class _Runs:
    """What both kinds of patching share: the twin and its sites, the edit that zeroes the
    super weights, resuming at a layer, the batches with a bar advanced per run, and the
    cost in single-pass equivalents (one pass: every layer over every window)."""

    def __init__(
        self,
        model: TransformerBridge,
        coords: Sequence[WeightCoord],
        cut: list[Window],
        protocol: Protocol,
        parts: Sequence[Component] | None,
        resume_at_parts: bool,
    ):
        self.model, self.n_windows = model, len(cut)
        self.parts = list(parts or components(model, coords))
        self.first = min(c.layer for c in coords)
        self.edits = column_edits(model, coords)
        # Where runs may start: the earliest zeroed layer, and each part's own layer when
        # parts are patched one at a time (every start is checked once, `fast.Resume`).
        starts = [self.first, *(c.layer for c in self.parts if resume_at_parts)]
        self.resume = Resume(model, starts)
        self.sites = _Sites(model, self.resume.twin, self.parts)
        self.batches = batches_on(cut, protocol, model.cfg.device)
        self.passes = 0.0

    def each_batch(self, desc: str, runs_per_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        total = len(self.batches) * runs_per_batch
        with progress.bar(desc=desc, unit="run", total=total) as self.shown:
            for batch in self.batches:
                yield batch()

    def count(self, ids: Tensor, layers: float) -> None:
        """Add one run of `layers` decoder layers over the windows in `ids`."""
        self.passes += layers / self.model.cfg.n_layers * len(ids) / self.n_windows
        self.shown.update(1)

    def run(self, start: int, kept: dict[int, Tensor], ids: Tensor) -> Tensor:
        """Logits of a run from layer `start` (see `fast.Resume`)."""
        exact = self.resume.exact[start]
        self.count(ids, self.model.cfg.n_layers - start if exact else self.model.cfg.n_layers)
        return self.resume.run(start, kept, ids)

    def clean(self, ids: Tensor) -> tuple[Tensor, dict, dict]:
        """(logits, kept residuals, site tensors) of the clean run."""
        self.resume.check(ids)
        with self.resume.keeping() as kept, self.sites.recording() as sites:
            logits = self.resume.twin(ids, use_cache=False).logits
        self.count(ids, self.model.cfg.n_layers)
        return logits, kept, sites

    @contextmanager
    def zeroed(self) -> Iterator[None]:
        with twin_ablation(self.model, self.edits):
            yield

    @contextmanager
    def differentiable_from(self, kept: dict[int, Tensor]) -> Iterator[dict[int, Tensor]]:
        """A start for a run whose activations require gradients: the residual entering
        the earliest zeroed layer as a leaf, or, where resuming is not exact, the
        embeddings' output (the run then starts at the embeddings)."""
        if self.resume.exact[self.first]:
            yield {self.first: kept[self.first].clone().requires_grad_(True)}
            return
        embed = self.resume.twin.get_input_embeddings()
        handle = embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
        try:
            yield kept
        finally:
            handle.remove()


def attribution_patching(
    model: TransformerBridge,
    coords: Sequence[WeightCoord],
    cut: list[Window],
    protocol: Protocol,
    parts: Sequence[Component] | None = None,
) -> Mediation:
    """The clean and zeroed losses and every component's attribution estimate. Cost: one
    clean pass, the zeroed run from the earliest zeroed layer, and its backward pass to
    that layer (activation gradients only: no parameter requires one meanwhile)."""
    runs = _Runs(model, coords, cut, protocol, parts, resume_at_parts=False)
    parts = runs.parts
    totals = dict.fromkeys(parts, 0.0)
    keys = sorted({_key(c) for c in parts})  # the sites whose gradients are needed
    clean, zeroed = [], []
    with frozen_parameters(runs.resume.twin):
        for ids, targets in runs.each_batch("attribution patching", 3):
            with torch.inference_mode():
                logits, kept, source = runs.clean(ids)
                clean.append(_check_finite(scored_nll(logits, targets), "clean"))
            with (
                torch.enable_grad(),
                runs.zeroed(),
                runs.differentiable_from(kept) as start,
                runs.sites.recording() as sites,
            ):
                losses = _check_finite(
                    scored_nll(runs.run(runs.first, start, ids), targets), "zeroed"
                )
                grad = torch.autograd.grad(losses.sum(), [sites[k] for k in keys])
                grads = dict(zip(keys, grad, strict=True))
            backward = model.cfg.n_layers - (runs.first if runs.resume.exact[runs.first] else 0)
            runs.count(ids, backward)
            zeroed.append(losses.detach())
            # Per site, (a_clean - a_zeroed) * dL/da summed over windows and positions:
            # one product per site, then each component sums its channels.
            per_channel = {
                k: einsum(source[k] - sites[k].detach(), grads[k], "b p d, b p d -> d").double()
                for k in keys
            }
            for c in parts:
                totals[c] += float(runs.sites.read(c, per_channel[_key(c)]).sum())
    n = sum(len(x) for x in clean)
    result = Mediation(protocol, n, float(torch.cat(clean).mean()), float(torch.cat(zeroed).mean()))
    result.attribution = {c: total / n for c, total in totals.items()}
    result.passes = runs.passes
    return result


def exact_patching(
    model: TransformerBridge,
    coords: Sequence[WeightCoord],
    cut: list[Window],
    protocol: Protocol,
    parts: Sequence[Component] | None = None,
) -> Mediation:
    """Every component of `parts` (default: all that can matter) patched alone, both
    ways. Cost: the clean and zeroed runs, then per component two runs from its layer."""
    runs = _Runs(model, coords, cut, protocol, parts, resume_at_parts=True)
    parts = runs.parts
    losses: dict[tuple[str, Component | None], list[Tensor]] = {}

    def add(key, logits, targets, what: str) -> None:
        losses.setdefault(key, []).append(_check_finite(scored_nll(logits, targets), what))

    with torch.inference_mode():
        for ids, targets in runs.each_batch("activation patching", 2 + 2 * len(parts)):
            logits, kept_clean, clean = runs.clean(ids)
            add(("clean", None), logits, targets, "clean")
            with runs.zeroed(), runs.resume.keeping() as kept_zeroed:
                with runs.sites.recording() as zeroed:
                    logits = runs.run(runs.first, kept_clean, ids)
            add(("zeroed", None), logits, targets, "zeroed")
            for c in parts:
                with runs.zeroed(), runs.sites.patched(c, clean):
                    logits = runs.run(c.layer, kept_zeroed, ids)
                add(("denoised", c), logits, targets, f"{c} restored")
                with runs.sites.patched(c, zeroed):
                    logits = runs.run(c.layer, kept_clean, ids)
                add(("noised", c), logits, targets, f"{c} zeroed")
    mean = {key: float(torch.cat(value).mean()) for key, value in losses.items()}
    n = sum(len(x) for x in losses["clean", None])
    result = Mediation(protocol, n, mean["clean", None], mean["zeroed", None])
    result.denoised = {c: mean["denoised", c] for c in parts}
    result.noised = {c: mean["noised", c] for c in parts}
    result.passes = runs.passes
    return result
