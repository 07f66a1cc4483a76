"""How a super weight acts inside the model: one call that runs every circuit analysis on
the same texts and returns typed results.

- `sinks`: the attention each head parks on the super-activation token, with the super
  weights and without (on the prompts and on corpus windows);
- `mediation`: which heads and MLPs carry the loss increase, by exact activation
  patching (both ways) and by attribution patching, and how well the two agree;
- `residual`: the super-activation token's residual stream and logit lens per layer.

Library users call `circuit` with a bridge, the weights and token ids; the command
``python -m experiments.circuit`` wraps it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.documents import PAGE_TOKENS
from sw_lens.errors import SwLensError
from sw_lens.mediation import (
    Component,
    Mediation,
    attribution_patching,
    components,
    exact_patching,
)
from sw_lens.patching import check_coords
from sw_lens.perplexity import Protocol, Window, batches_on
from sw_lens.residual import ResidualStory, residual_story
from sw_lens.sinks import SinkMap, head_patterns, sink_map
from sw_lens.vocabulary import WeightCoord


@dataclass
class Agreement:
    """How well attribution patching's estimates rank the exact recoveries."""

    n_components: int
    spearman: float | None  # None with fewer than two components
    k: int
    top_k_overlap: int  # components in both top-k lists
    attribution_rank_of_exact_top: int  # 1-based

    @staticmethod
    def of(exact: dict[Component, float], estimated: dict[Component, float], k: int) -> "Agreement":
        parts = list(exact)
        a = torch.tensor([exact[c] for c in parts], dtype=torch.float64)
        b = torch.tensor([estimated[c] for c in parts], dtype=torch.float64)
        k = min(k, len(parts))
        top_a = set(a.argsort(descending=True)[:k].tolist())
        top_b = set(b.argsort(descending=True)[:k].tolist())
        order_b = b.argsort(descending=True).tolist()
        return Agreement(
            n_components=len(parts),
            spearman=_spearman(a, b),
            k=k,
            top_k_overlap=len(top_a & top_b),
            attribution_rank_of_exact_top=order_b.index(int(a.argmax())) + 1,
        )


def _spearman(a: Tensor, b: Tensor) -> float | None:
    """Rank correlation (ties broken by order: values here are continuous)."""
    if len(a) < 2:
        return None
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@dataclass
class AttentionPages:
    """The attention patterns the pages show: the heads whose sink mass changed most on
    the corpus sample, on the first prompt (its first `PAGE_TOKENS` tokens)."""

    tokens: list[str]
    heads: list[tuple[int, int]]
    clean: Float[Tensor, "n pos pos"]
    zeroed: Float[Tensor, "n pos pos"]

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "heads": [list(h) for h in self.heads],
            "clean": self.clean.tolist(),
            "zeroed": self.zeroed.tolist(),
        }


@dataclass
class Circuit:
    prompt_sinks: SinkMap
    corpus_sinks: SinkMap
    attribution: Mediation  # every component's estimate
    exact: Mediation  # the components patched exactly (all, or attribution's top)
    agreement: Agreement
    story: ResidualStory
    pages: AttentionPages

    def component_rows(self) -> list[dict]:
        exact, attribution = self.exact, self.attribution
        return [
            {
                "layer": c.layer,
                "head": c.head,
                "name": c.name,
                "label": str(c),
                "estimated": attribution.estimated(c),
                "recovered": exact.recovered(c) if c in exact.denoised else None,
                "reproduced": exact.reproduced(c) if c in exact.noised else None,
            }
            for c in sorted(attribution.attribution, key=Component.order)
        ]


def _losses(m: Mediation) -> dict:
    return {
        "protocol_description": m.protocol.describe(),
        "n_tokens": m.n_tokens,
        "clean_nll": m.clean,
        "zeroed_nll": m.zeroed,
        "passes": m.passes,
    }


def circuit_dict(result: Circuit) -> dict:
    """The results of `circuit`, as the circuit document's fields."""
    return {
        "sinks": {
            "prompt": result.prompt_sinks.to_dict(),
            "corpus": result.corpus_sinks.to_dict(),
        },
        "patching": {
            "attribution": _losses(result.attribution),
            "exact": _losses(result.exact),
            "components": result.component_rows(),
        },
        "agreement": result.agreement.__dict__,
        "residual": result.story.to_dict(),
        "attention": result.pages.to_dict(),
    }


def circuit(
    model: TransformerBridge,
    coords: Sequence[WeightCoord],
    prompts: Sequence[Int[Tensor, "pos"]],
    cut: list[Window],
    protocol: Protocol,
    *,
    fraction: float = 0.1,
    heads_shown: int = 4,
    exact_top: int = 0,
    top_k: int = 10,
) -> Circuit:
    """Every circuit analysis of the super weights `coords` (zeroed together; the first,
    the strongest, names the super-activation channel and its tokens): sink maps on the
    `prompts` and on the corpus windows `cut`, attribution patching of every component,
    exact patching of every component (or of attribution's `exact_top`), and the residual
    story on the first prompt's super-activation token."""
    coords = list(coords)
    if not coords:
        raise SwLensError("no super weight to analyse")
    check_coords(model, coords)
    device = model.cfg.device
    prompt_ids = [p[None].to(device) for p in prompts]
    corpus_ids = [batch()[0] for batch in batches_on(cut, protocol, device)]
    prompt_sinks = sink_map(model, prompt_ids, coords, fraction)
    corpus_sinks = sink_map(model, corpus_ids, coords, fraction)
    attribution = attribution_patching(model, coords, cut, protocol)
    if attribution.increase == 0:
        raise SwLensError(
            f"zeroing {', '.join(map(str, coords))} leaves the loss on these "
            f"{attribution.n_tokens} tokens unchanged: there is no effect to attribute"
        )
    parts = components(model, coords)
    if exact_top:
        parts = sorted(parts, key=lambda c: -abs(attribution.estimated(c)))[:exact_top]
    exact = exact_patching(model, coords, cut, protocol, parts)
    estimated = {c: attribution.estimated(c) for c in parts}
    recovered = {c: exact.recovered(c) for c in parts}
    heads = corpus_sinks.top_heads(heads_shown)
    shown = prompts[0][:PAGE_TOKENS]  # a page of patterns: pos x pos per head
    clean, zeroed = head_patterns(model, shown[None].to(device), heads, coords)
    tokens = [model.tokenizer.decode([int(t)]) for t in shown]
    return Circuit(
        prompt_sinks=prompt_sinks,
        corpus_sinks=corpus_sinks,
        attribution=attribution,
        exact=exact,
        agreement=Agreement.of(recovered, estimated, top_k),
        story=residual_story(model, prompt_ids[0], prompt_sinks.peak_positions[0], coords),
        pages=AttentionPages(tokens, heads, clean, zeroed),
    )
