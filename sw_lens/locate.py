"""The paper's rule for super weights, made explicit, iterated, and checked by effect.

Rule (Yu et al. 2024, Sec. 3.1): in a layer whose down-projection input spikes at
channel ``col`` and output spikes at channel ``row`` on the same token, the super weight
is HF ``down_proj.weight[row, col]`` (TransformerLens ``W_out[layer][col, row]``).
"Spikes" is the stated `Criterion`, saved with every result. Then: remove what was
found, scan again, take what is newly exposed.

The literal rule has three traps on real models, each handled here and reported:
1. **It need not terminate.** Zeroing ``W[row, col]`` leaves the input neuron ``col``
   spiking (its input is computed before the down-projection), so the rule next takes
   ``W[row', col]``, then ``W[row'', col]``... Termination rule: a (layer, input
   neuron) yields at most one weight; a later hit on the same neuron is recorded as
   skipped. Iteration stops when a scan exposes nothing new, or at ``max_iterations``.
2. **A layer can cancel a massive activation rather than create it.** When the MLP's
   output shrinks the residual stream at its spike (see `LayerSpikes.cancels`), the
   weight is kept with ``role="cancels"`` but not ablated in later scans, since removing
   it hides nothing.
3. **The first weight found is not necessarily the one that matters.** `rank_by_effect`
   measures the perplexity increase of zeroing each weight alone and marks super weights
   by that evidence (``min_ppl_ratio``), not by discovery order.
"""

import logging
import typing
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from statistics import median

import pydantic
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.options import Finite, option
from sw_lens.patching import ablation_hooks, check_coords, weight_value
from sw_lens.perplexity import PerplexityResult, Protocol, evaluate_sweep
from sw_lens.predictions import next_token_logits
from sw_lens.scan import LayerSpikes, ScanResult, Spike, scan
from sw_lens.vocabulary import WeightCoord, down_proj_parameter, stored_index, w_out

log = logging.getLogger(__name__)


@pydantic.dataclasses.dataclass(frozen=True)
class Criterion:
    """When a layer's down-projection spikes "stand out"; both hooks must pass."""

    min_abs: Finite = option(50.0, "min |activation| of a spike", flag="threshold")
    min_ratio: Finite = option(10.0, "min spike / median over layers of the same hook's spike")
    min_ppl_ratio: Finite = option(
        1.1, "perplexity ratio (zeroed alone / baseline) to call a weight super"
    )

    def to_dict(self) -> dict:
        return asdict(self) | {"description": self.describe()}

    def describe(self) -> str:
        return (
            f"max |hook_post| and max |down_proj output| of a layer both >= {self.min_abs:g} and "
            f">= {self.min_ratio:g}x the median over layers of that hook's max, on the same "
            f"token; called a super weight when zeroing it alone multiplies perplexity by "
            f">= {self.min_ppl_ratio:g}"
        )

    def stands_out(self, spike: Spike, layer_median: float) -> bool:
        return spike.magnitude >= self.min_abs and spike.magnitude >= self.min_ratio * layer_median


@dataclass
class Candidate:
    """A weight the rule found, with the evidence for it."""

    coord: WeightCoord
    value: float  # the weight, as stored in the checkpoint
    hf_param: str  # e.g. model.layers.2.mlp.down_proj.weight
    hf_index: tuple[int, int]  # index into hf_param in its own layout
    iteration: int  # 1 = the first scan
    post: Spike  # the input activation that exposed it (channel = col)
    mlp_out: Spike  # the output activation (channel = row)
    resid_mid: float | None  # residual entering the MLP at the output spike
    role: str  # "creates" or "cancels" the massive activation
    ppl_alone: float | None = None  # perplexity with only this weight zeroed
    effect: float | None = None  # ppl_alone / baseline perplexity
    is_super: bool | None = None  # effect >= criterion.min_ppl_ratio


@dataclass
class LocateResult:
    criterion: Criterion
    candidates: list[Candidate]
    scans: list[ScanResult]  # one per iteration, each with the earlier finds ablated
    termination: str
    notes: list[str] = field(default_factory=list)
    ranking: PerplexityResult | None = None  # baseline of the effect ranking

    @property
    def super_weights(self) -> list[Candidate]:
        return [c for c in self.candidates if c.is_super]


def medians(result: ScanResult) -> tuple[float, float]:
    """Median over layers of max |hook_post| and of max |down-projection output|."""
    return (
        median(s.post.magnitude for s in result.layers),
        median(s.mlp_out.magnitude for s in result.layers),
    )


class RuleModel(typing.Protocol):
    """What the spike rule, the effect ranking and the experiments that stream (controls,
    scaling, stopwords; quantize has its own edits) ask of a model: held in memory
    (`InMemory`, a bridge) or read one layer at a time from its checkpoint
    (`stream.StreamedModel`)."""

    n_layers: int
    w_out_shape: tuple[int, int]  # (d_mlp, d_model)

    def check_coords(self, coords: Sequence[WeightCoord]) -> None: ...

    def scan(
        self, texts: Sequence[Tensor], prepend_bos: bool, ablation: Sequence[WeightCoord]
    ) -> ScanResult: ...

    def weight(self, coord: WeightCoord) -> tuple[float, str, bool]: ...

    def w_out(self, layer: int) -> AbstractContextManager[Float[Tensor, "d_mlp d_model"]]: ...

    def sweep(
        self,
        tokens: Tensor,
        protocol: Protocol,
        corpus: str,
        ablations: list,
        desc: str,
        scale: float | Sequence[float] = 0.0,
    ) -> tuple[PerplexityResult, list[PerplexityResult]]: ...

    def next_token_logits(
        self, contexts: Sequence[Tensor], ablation: Sequence[WeightCoord] = (), scale: float = 0.0
    ) -> list[Float[Tensor, "d_vocab"]]: ...


@dataclass
class InMemory:
    """A bridge as a `RuleModel`: scans with ablation hooks, the prefix-reusing sweep."""

    bridge: TransformerBridge

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def w_out_shape(self) -> tuple[int, int]:
        return self.bridge.cfg.d_mlp, self.bridge.cfg.d_model

    def check_coords(self, coords) -> None:
        check_coords(self.bridge, coords)

    def scan(self, texts, prepend_bos, ablation) -> ScanResult:
        return scan(self.bridge, texts, prepend_bos, ablation_hooks(self.bridge, ablation))

    def weight(self, coord: WeightCoord) -> tuple[float, str, bool]:
        """The weight's value, its HF parameter and whether that is stored as nn.Linear."""
        return weight_value(self.bridge, coord), *down_proj_parameter(self.bridge, coord.layer)

    def w_out(self, layer: int) -> AbstractContextManager[Float[Tensor, "d_mlp d_model"]]:
        return w_out(self.bridge, layer)

    def sweep(self, tokens, protocol, corpus, ablations, desc, scale=0.0):
        return evaluate_sweep(self.bridge, tokens, protocol, corpus, ablations, scale, desc)

    def next_token_logits(self, contexts, ablation=(), scale=0.0) -> list[Tensor]:
        return next_token_logits(self.bridge, contexts, ablation, scale)


def rule_model(model: TransformerBridge | RuleModel) -> RuleModel:
    return InMemory(model) if isinstance(model, TransformerBridge) else model


def apply_rule(
    model: TransformerBridge | RuleModel,
    result: ScanResult,
    criterion: Criterion,
    iteration: int,
    taken_neurons: set[tuple[int, int]],
) -> tuple[list[Candidate], list[str]]:
    """One pass of the rule over a scan: new candidates, and why other spikes were passed."""
    model = rule_model(model)
    post_median, out_median = medians(result)
    found, notes = [], []
    for s in result.layers:
        if not (
            criterion.stands_out(s.post, post_median)
            and criterion.stands_out(s.mlp_out, out_median)
        ):
            continue
        if (s.post.text, s.post.pos) != (s.mlp_out.text, s.mlp_out.pos):
            notes.append(
                f"iteration {iteration}, layer {s.layer}: input and output spikes sit on "
                f"different tokens ({s.post.token!r} vs {s.mlp_out.token!r}); not one weight"
            )
            continue
        if (s.layer, s.post.channel) in taken_neurons:
            notes.append(
                f"layer {s.layer}: input neuron {s.post.channel} still spikes after its weight "
                f"was ablated; its other weights are not taken (termination rule)"
            )
            continue
        found.append(_candidate(model, s, iteration))
    return found, notes


def _candidate(model: RuleModel, s: LayerSpikes, iteration: int) -> Candidate:
    coord = WeightCoord(s.layer, row=s.mlp_out.channel, col=s.post.channel)
    value, hf_param, linear = model.weight(coord)
    return Candidate(
        coord=coord,
        value=value,
        hf_param=hf_param,
        hf_index=stored_index(coord, linear),
        iteration=iteration,
        post=s.post,
        mlp_out=s.mlp_out,
        resid_mid=s.resid_mid,
        role="cancels" if s.cancels else "creates",
    )


def earliest(found: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """(taken, deferred). The paper removes one super weight and scans again: of the
    weights that create a spike, only the earliest layer's is taken from a scan, since a
    later layer's spike may be that one's echo and vanish once it is removed (on a real
    model the whole-scan rule admitted such a weight, z = -3.9 in its matrix). Cancelling
    weights are never removed, so they change no later scan, and are all taken."""
    creating = [c.coord.layer for c in found if c.role == "creates"]
    if not creating:
        return found, []
    first = min(creating)
    taken = [c for c in found if c.role == "cancels" or c.coord.layer == first]
    return taken, [c for c in found if c not in taken]


def locate(
    model: TransformerBridge | RuleModel,
    texts: Sequence[Int[Tensor, "pos"]],
    prepend_bos: bool,
    criterion: Criterion = Criterion(),
    max_iterations: int = 5,
) -> LocateResult:
    """Scan, apply the rule, take the earliest layer's weight (`earliest`), ablate it
    (hooks, or edits as a streamed layer is read; the model is never edited), scan again,
    until nothing new is exposed or `max_iterations` scans were made. Each candidate
    records the scan it came from."""
    model = rule_model(model)
    candidates: list[Candidate] = []
    scans: list[ScanResult] = []
    notes: list[str] = []
    taken: set[tuple[int, int]] = set()
    termination = f"iteration limit ({max_iterations}) reached"
    for iteration in range(1, max_iterations + 1):
        ablated = [c.coord for c in candidates if c.role == "creates"]
        result = model.scan(texts, prepend_bos, ablated)
        scans.append(result)
        found, passed = apply_rule(model, result, criterion, iteration, taken)
        found, deferred = earliest(found)
        passed += [
            f"iteration {iteration}, layer {c.coord.layer}: also qualifies; left for the next "
            f"scan, after the earliest layer's weight is removed"
            for c in deferred
        ]
        notes.extend(note for note in passed if note not in notes)
        if not found:
            termination = f"iteration {iteration} exposed no new weight"
            break
        for c in found:
            log.info("iteration %d: %s = %.4g (%s)", iteration, c.coord, c.value, c.role)
            taken.add((c.coord.layer, c.coord.col))
            if c.role == "cancels":
                notes.append(
                    f"iteration {iteration}, layer {c.coord.layer}: the MLP cancels a massive "
                    f"activation (residual {c.resid_mid:.4g}, MLP output {c.mlp_out.value:.4g}); "
                    f"kept as a candidate, not ablated in later scans"
                )
        candidates.extend(found)
    return LocateResult(criterion, candidates, scans, termination, notes)


def rank_by_effect(
    model: TransformerBridge | RuleModel,
    result: LocateResult,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
) -> LocateResult:
    """Zero each candidate alone on `tokens` under `protocol` (a short budget suffices to
    tell a 1.5x effect from none), mark super weights by the criterion's perplexity ratio
    and sort candidates by effect, largest first. One sweep: the layers before the
    earliest candidate run once per window (`perplexity.evaluate_sweep`)."""
    baseline, alone = rule_model(model).sweep(
        tokens, protocol, corpus, [[c.coord] for c in result.candidates], "rank"
    )
    for c, ablated in zip(result.candidates, alone, strict=True):
        c.ppl_alone = ablated.perplexity
        c.effect = ablated.perplexity / baseline.perplexity
        c.is_super = c.effect >= result.criterion.min_ppl_ratio
    result.candidates.sort(key=lambda c: -c.effect)
    result.ranking = baseline
    return result
