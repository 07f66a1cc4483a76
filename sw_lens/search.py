"""Every single weight the model depends on: a threshold-free search, verified by effect.

The paper's rule finds a super weight through the size of its spikes, and any threshold
on that size is wrong for some model (spikes differ by orders of magnitude between
models, and the weight that matters need not sit in the layer with the most outstanding
spike). What decides is the measured effect of zeroing the weight, so this search ranks
*every* down-projection weight by two screens that need no threshold, measures the top
of both (plus the rule's candidates), and states its recall:

1. **Largest contribution.** Weight ``W[row, col]`` adds ``post[t, col] * W[row, col]``
   to output channel ``row`` at token ``t``; its largest contribution over the scanned
   tokens is exactly ``|W[row, col]| * max_t |post[t, col]|``. One forward pass over the
   prompts and a corpus sample keeps per layer the d_mlp maxima of the
   down-projection's input; the products are formed one layer at a time.
2. **Saliency** (Optimal Brain Damage, the sensitivity SqueezeLLM and SpQR use):
   ``0.5 * W^2 * E[(dL/dW)^2]``, the second-order estimate of zeroing's loss increase,
   with squared gradients of the down-projection weights accumulated per corpus window
   (one backward pass each).

Measured: the top `search_k` of each screen and the rule's candidates, each zeroed
alone (`evaluate_sweep`); then down the contribution ranking until `stop_run`
consecutive weights are all below `negligible`; then a random sample from beyond that
rank, stratified by contribution. A sampled weight above the criterion is reported
loudly and the search widens. Weights whose effect is near the criterion or above it are
measured again on the reported budget, which decides whether they are super (a
1,000-token ranking can misjudge a small effect by 10%).
"""

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import pydantic
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import NonFiniteActivation
from sw_lens.fast import down_proj_module, frozen_parameters, hf_twin
from sw_lens.options import NonNegativeInt, PositiveFinite, PositiveInt, option
from sw_lens.patching import weight_value
from sw_lens.perplexity import (
    IGNORE,
    PerplexityResult,
    Protocol,
    evaluate_sweep,
    extended,
    rest_of,
    shared_tokens,
    window_batches,
    windows,
)
from sw_lens.vocabulary import WeightCoord, down_proj_parameter, w_out

log = logging.getLogger(__name__)

BANDS = 4  # decades of contribution below the stopping rank that the sample is spread over


@pydantic.dataclasses.dataclass(frozen=True)
class SearchParameters:
    """The search's stated parameters (options of every command that finds weights)."""

    search_k: PositiveInt = option(16, "weights measured from the top of each screen")
    stop_run: PositiveInt = option(
        8, "the walk down the contribution ranking ends after this many negligible weights"
    )
    negligible: PositiveFinite = option(
        1.02, "a perplexity ratio below this is a negligible effect"
    )
    recall_sample: NonNegativeInt = option(
        8, "random weights measured beyond the walk's end, spread over decades of contribution"
    )
    max_walk: PositiveInt = option(256, "the deepest contribution rank the walk may measure")
    confirm_margin: PositiveFinite = option(
        1.05,
        "weights whose effect on the ranking budget is within this factor of the criterion "
        "(or above it) are measured again on the reported budget, which decides",
    )


@dataclass
class Measured:
    """One weight zeroed alone, and how the search came to measure it."""

    coord: WeightCoord
    value: float
    found_by: list[str]  # "spike rule", "contribution", "saliency", "walk", "sample", "given"
    contribution_rank: int  # 1 = the largest contribution in the model
    saliency_rank: int | None  # None where the saliency screen did not run
    effect: float  # perplexity ratio on the ranking budget
    ppl_alone: float
    confirmed_effect: float | None = None  # ... on the reported budget, near or above the criterion
    is_super: bool = False


@dataclass
class SearchResult:
    parameters: SearchParameters
    ranking: PerplexityResult  # the baseline every effect is measured against
    confirmation: PerplexityResult | None  # the reported budget's baseline
    confirmed: dict[WeightCoord, PerplexityResult]  # ... and each weight measured on it
    measured: list[Measured]  # by effect, largest first
    stop_rank: int  # the walk down the contribution ranking stopped here
    stop_reason: str
    screen_overlap: int | None  # weights in both screens' top search_k
    sample_max: float | None  # largest effect among the random sample
    widened: int  # times the sample found a weight above the criterion
    warnings: list[str] = field(default_factory=list)
    min_ppl_ratio: float = 1.1

    @property
    def super_weights(self) -> list[Measured]:
        return [m for m in self.measured if m.is_super]

    @property
    def ranking_noise(self) -> float | None:
        """The largest relative change of a confirmed effect between the ranking budget
        and the reported one: how far a ranking-budget effect can be trusted."""
        changes = [
            abs(m.confirmed_effect / m.effect - 1) for m in self.measured if m.confirmed_effect
        ]
        return max(changes, default=None)

    @property
    def confirmation_tokens(self) -> int:
        """Tokens of the budget that decided which weights are super."""
        return (self.confirmation or self.ranking).n_tokens

    def verdict(self) -> str:
        found = self.super_weights
        if found:
            return f"{len(found)} super weight(s) at this criterion (x{self.min_ppl_ratio:g})"
        top = self.measured[0]
        return (
            f"no super weight at this criterion (x{self.min_ppl_ratio:g}): the largest "
            f"single-weight effect measured is x{top.effect:.4f}, {top.coord}, among "
            f"{len(self.measured)} weights measured"
        )


# --- screens ------------------------------------------------------------------------------


def _inputs(texts: Sequence[Tensor], tokens: Tensor, protocol: Protocol, model) -> list:
    """The forward passes of the screens: each prompt alone, then the corpus windows."""
    batches = [ids[None] for ids in texts]
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    return batches + [ids for ids, _ in window_batches(cut, protocol, "cpu", "screen")]


def post_maxima(model: TransformerBridge, inputs: Sequence[Tensor]) -> list[Float[Tensor, "d_mlp"]]:
    """Per layer, the largest |down-projection input| per channel over every token of
    `inputs` (the HF twin's down-projection modules; no TransformerLens hook needed)."""
    twin = hf_twin(model)
    maxima = [None] * model.cfg.n_layers
    handles = []

    def keep(module, args, layer) -> None:
        seen = args[0].detach().abs().amax(dim=(0, 1)).float()
        maxima[layer] = seen if maxima[layer] is None else torch.maximum(maxima[layer], seen)

    for layer in range(model.cfg.n_layers):
        module = down_proj_module(model, twin, layer)
        handles.append(
            module.register_forward_pre_hook(lambda m, a, layer=layer: keep(m, a, layer))
        )
    try:
        with torch.inference_mode():
            for ids in inputs:
                twin(ids.to(model.cfg.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for layer, m in enumerate(maxima):
        if not torch.isfinite(m).all():
            raise NonFiniteActivation(
                f"layer {layer}: the down-projection input is NaN or infinite in "
                f"{model.cfg.dtype}; use --dtype float32"
            )
    return maxima


def squared_gradients(
    model: TransformerBridge, tokens: Tensor, protocol: Protocol
) -> list[Float[Tensor, "d_mlp d_model"]]:
    """Per layer, the mean over corpus windows of (dL/dW_out)^2, L a window's mean NLL:
    one forward and one backward pass per window, with gradients for the down-projection
    weights only (every other parameter's ``requires_grad`` is off while this runs and is
    put back after, as are the gradients). Memory: one window's activations for the
    backward pass, plus one float32 copy of the down-projection weights (and, where a
    device map offloads them, the weights themselves, loaded for the whole pass)."""
    twin = hf_twin(model)
    downs = [down_proj_parameter(model, layer) for layer in range(model.cfg.n_layers)]
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    one_at_a_time = replace(protocol, batch_size=1)
    with ExitStack() as stack:
        stack.enter_context(frozen_parameters(twin))
        for layer in range(model.cfg.n_layers):
            stack.enter_context(w_out(model, layer))
        stack.enter_context(torch.enable_grad())
        weights = [twin.get_parameter(name) for name, _ in downs]
        totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        for w in weights:
            w.requires_grad_(True)
        for input_ids, targets in window_batches(cut, one_at_a_time, model.cfg.device, "saliency"):
            logits = twin(input_ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE
            )
            grads = torch.autograd.grad(loss, weights)
            for total, grad in zip(totals, grads, strict=True):
                total += grad.float() ** 2
    # In W_out's layout, [d_mlp, d_model], like the contribution screen.
    return [
        (total / len(cut)).T if linear else total / len(cut)
        for total, (_, linear) in zip(totals, downs, strict=True)
    ]


class Screen:
    """A score for every down-projection weight of the model, formed one layer at a time
    when asked (never more than one layer's products in memory), in W_out's layout."""

    def __init__(self, name: str, model: TransformerBridge, layer_scores):
        self.name, self.model, self._layer_scores = name, model, layer_scores

    def layer(self, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        return self._layer_scores(layer)

    def _coord(self, layer: int, flat: int) -> WeightCoord:
        d_model = self.model.cfg.d_model
        return WeightCoord(layer, row=flat % d_model, col=flat // d_model)

    def top(self, n: int) -> list[WeightCoord]:
        """The `n` highest-scoring weights of the model, highest first."""
        best: list[tuple[float, int, int]] = []
        for layer in range(self.model.cfg.n_layers):
            scores = self.layer(layer).flatten()
            values, flat = scores.topk(min(n, len(scores)))
            best += [(float(v), layer, int(i)) for v, i in zip(values, flat, strict=True)]
            best = sorted(best, key=lambda b: (-b[0], b[1], b[2]))[:n]
        return [self._coord(layer, flat) for _, layer, flat in best]

    def score(self, coord: WeightCoord) -> float:
        return float(self.layer(coord.layer)[coord.col, coord.row])

    def ranks(self, coords: Sequence[WeightCoord]) -> list[int]:
        """Each weight's rank in the whole model (1 = the highest score)."""
        scores = [self.score(c) for c in coords]
        above = [1] * len(coords)
        for layer in range(self.model.cfg.n_layers):
            values = self.layer(layer)
            for i, s in enumerate(scores):
                above[i] += int((values > s).sum())
        return above

    def _in_band(self, layer: int, low: float, high: float) -> Tensor:
        scores = self.layer(layer)
        return (scores > low) & (scores < high)

    def sample(
        self, below: float, n: int, generator: torch.Generator, exclude: set[WeightCoord]
    ) -> list[WeightCoord]:
        """`n` random weights scoring below `below`, spread evenly over `BANDS` decades
        of score (the last band: everything smaller)."""
        picks: list[WeightCoord] = []
        for band in range(BANDS):
            high = below / 10**band
            low = below / 10 ** (band + 1) if band < BANDS - 1 else -1.0
            want = n // BANDS + (band < n % BANDS)
            counts = torch.tensor(
                [
                    int(self._in_band(layer, low, high).sum())
                    for layer in range(self.model.cfg.n_layers)
                ],
                dtype=torch.float64,
            )
            for _ in range(want if counts.sum() else 0):
                layer = int(torch.multinomial(counts, 1, generator=generator))
                members = self._in_band(layer, low, high).flatten().nonzero()[:, 0]
                flat = int(members[torch.randint(len(members), (1,), generator=generator)])
                coord = self._coord(layer, flat)
                if coord not in exclude and coord not in picks:
                    picks.append(coord)
        return picks


def contribution_screen(model: TransformerBridge, maxima: list[Tensor]) -> Screen:
    def scores(layer: int) -> Tensor:
        with w_out(model, layer) as weight:
            return weight.detach().abs().float() * maxima[layer][:, None]

    return Screen("contribution", model, scores)


def saliency_screen(model: TransformerBridge, squared: list[Tensor]) -> Screen:
    def scores(layer: int) -> Tensor:
        with w_out(model, layer) as weight:
            return 0.5 * weight.detach().float() ** 2 * squared[layer]

    return Screen("saliency", model, scores)


# --- the search ------------------------------------------------------------------------------


class _Measurer:
    """Zero weights alone on the ranking budget, each once, and remember the effects."""

    def __init__(self, model, tokens, protocol, corpus):
        self.model, self.tokens, self.protocol, self.corpus = model, tokens, protocol, corpus
        self.effects: dict[WeightCoord, PerplexityResult] = {}
        self.baseline: PerplexityResult | None = None
        self.found_by: dict[WeightCoord, list[str]] = {}

    def __call__(self, sources: dict[str, Sequence[WeightCoord]]) -> None:
        """Measure the weights of every source (how it came to be measured -> weights)
        that are not measured yet, in one sweep."""
        for how, coords in sources.items():
            for c in coords:
                self.found_by.setdefault(c, [])
                if how not in self.found_by[c]:
                    self.found_by[c].append(how)
        new = [c for c in self.found_by if c not in self.effects]
        if new:
            baseline, alone = evaluate_sweep(
                self.model,
                self.tokens,
                self.protocol,
                self.corpus,
                [[c] for c in new],
                desc=f"measure {len(new)} weights",
            )
            self.baseline = baseline
            self.effects.update(zip(new, alone, strict=True))

    def effect(self, coord: WeightCoord) -> float:
        return self.effects[coord].perplexity / self.baseline.perplexity


def search(
    model: TransformerBridge,
    texts: Sequence[Tensor],
    tokens: Tensor,
    rank_protocol: Protocol,
    protocol: Protocol,
    corpus: str,
    rule: Sequence[WeightCoord] = (),
    given: Sequence[WeightCoord] = (),
    parameters: SearchParameters | None = None,
    min_ppl_ratio: float = 1.1,
    saliency: bool = True,
    seed: int = 0,
) -> SearchResult:
    """The threshold-free search (module docstring). `texts` are the scanned prompts,
    `tokens` the corpus: its `rank_protocol` windows are the screens' sample and the
    ranking budget, `protocol` the reported budget that confirms each non-negligible
    effect. `rule` are the spike rule's candidates, `given` weights named by the user."""
    p = parameters or SearchParameters()
    contribution = contribution_screen(
        model, post_maxima(model, _inputs(texts, tokens, rank_protocol, model))
    )
    screens = [contribution]
    if saliency:
        screens.append(saliency_screen(model, squared_gradients(model, tokens, rank_protocol)))
    walk = contribution.top(p.max_walk)
    tops = {
        s.name: (walk[: p.search_k] if s is contribution else s.top(p.search_k)) for s in screens
    }
    measure = _Measurer(model, tokens, rank_protocol, corpus)
    measure({"spike rule": list(rule), "given": list(given), **tops})
    warnings: list[str] = []
    stop, widened, sample_max = p.search_k, 0, None
    generator = torch.Generator().manual_seed(seed)
    while True:
        stop, reason = _walk(measure, walk, stop, p)
        below = contribution.score(walk[stop - 1])
        sample = contribution.sample(below, p.recall_sample, generator, set(measure.effects))
        measure({"sample": sample})
        effects = [measure.effect(c) for c in sample]
        sample_max = max(effects, default=None)
        above = [c for c, e in zip(sample, effects, strict=True) if e >= min_ppl_ratio]
        if not above or stop >= len(walk):
            break
        widened += 1
        warnings.append(
            f"the random sample beyond contribution rank {stop} found "
            f"{', '.join(str(c) for c in above)} above x{min_ppl_ratio:g}: the screens missed "
            f"it; the search widened to rank {min(2 * stop, len(walk))}"
        )
        log.warning(warnings[-1])
        measure({"walk": walk[stop : 2 * stop]})
        stop = min(2 * stop, len(walk))
    confirmation, confirmed = _confirm(
        measure, model, tokens, protocol, corpus, min_ppl_ratio / p.confirm_margin
    )
    ratio = {c: r.perplexity / confirmation.perplexity for c, r in confirmed.items()}
    ranks = {
        s.name: dict(zip(measure.effects, s.ranks(list(measure.effects)), strict=True))
        for s in screens
    }
    measured = [
        Measured(
            coord=c,
            value=weight_value(model, c),
            found_by=measure.found_by[c],
            contribution_rank=ranks["contribution"][c],
            saliency_rank=ranks.get("saliency", {}).get(c),
            effect=measure.effect(c),
            ppl_alone=result.perplexity,
            confirmed_effect=ratio.get(c),
            is_super=ratio.get(c, 0.0) >= min_ppl_ratio,
        )
        for c, result in measure.effects.items()
    ]
    measured.sort(key=lambda m: (-(m.confirmed_effect or m.effect), m.coord))
    overlap = len(set(tops["contribution"]) & set(tops["saliency"])) if saliency else None
    return SearchResult(
        parameters=p,
        ranking=measure.baseline,
        confirmation=confirmation,
        confirmed=confirmed,
        measured=measured,
        stop_rank=stop,
        stop_reason=reason,
        screen_overlap=overlap,
        sample_max=sample_max,
        widened=widened,
        warnings=warnings,
        min_ppl_ratio=min_ppl_ratio,
    )


def _walk(measure: _Measurer, walk: list[WeightCoord], stop: int, p: SearchParameters):
    """Everything above contribution rank `stop` is measured; measure on down the ranking
    until the last `stop_run` weights are all negligible. Returns the rank reached and
    why the walk stopped there."""
    while True:
        first = max(stop - p.stop_run, 0)
        if all(measure.effect(c) < p.negligible for c in walk[first:stop]):
            return stop, (
                f"the weights at contribution ranks {first + 1}-{stop} are all below "
                f"x{p.negligible:g}"
            )
        if stop >= len(walk):
            return stop, (
                f"the walk reached its limit (rank {len(walk)}) with effects of "
                f"x{p.negligible:g} or more among its last {p.stop_run} weights"
            )
        measure({"walk": walk[stop : stop + p.stop_run]})
        stop = min(stop + p.stop_run, len(walk))


def _confirm(
    measure: _Measurer, model, tokens, protocol, corpus, above: float
) -> tuple[PerplexityResult | None, dict[WeightCoord, PerplexityResult]]:
    """Each weight whose effect on the ranking budget reaches `above`, zeroed alone again
    on the reported budget: the reported baseline and each weight's perplexity. Where
    the ranking windows are the reported budget's first windows, they are not run again."""
    chosen = [c for c in measure.effects if measure.effect(c) >= above]
    if not chosen:
        return None, {}
    shared = shared_tokens(tokens, measure.protocol, protocol)
    baseline, alone = evaluate_sweep(
        model,
        tokens[shared:],
        rest_of(protocol, shared),
        corpus,
        [[c] for c in chosen],
        desc="confirm",
    )
    if shared:
        baseline = extended(measure.baseline, baseline, shared, protocol)
        alone = [
            extended(measure.effects[c], r, shared, protocol)
            for c, r in zip(chosen, alone, strict=True)
        ]
    return baseline, dict(zip(chosen, alone, strict=True))
