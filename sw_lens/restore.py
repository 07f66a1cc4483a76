"""Zero the super weight, then put its super activation back (paper, Sec. 3.2, Fig. 3).

If the super weight matters *through* the super activation, restoring that one
activation should recover much of what zeroing the weight lost. For each super weight
the down-projection output at its channel ``row`` is kept at its unablated value
wherever the unablated value is massive: at least `fraction` of the super activation
measured on the scanned prompts. Everywhere else the weight stays zeroed. No model name
is looked at: the channel, layer and threshold come from the scan.

The unablated value needs no second pass: the down-projection's input does not depend
on its own weights, so the hook sees the exact unablated output and the ablated one side
by side (`patching.EditedColumns`).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import SwLensError
from sw_lens.locate import rule_model
from sw_lens.perplexity import PerplexityResult, Protocol, evaluate
from sw_lens.scan import column_maxima
from sw_lens.stream import StreamedModel, evaluate_restored, row_maxima
from sw_lens.vocabulary import WeightCoord


@dataclass
class Restoration:
    baseline: PerplexityResult
    ablated: PerplexityResult  # super weights zeroed
    restored: PerplexityResult  # ... with the super activations put back
    thresholds: dict[tuple[int, int], float]  # (layer, row) -> |activation| restored above
    super_activations: dict[tuple[int, int], float]  # (layer, row) -> signed, on the prompts

    @property
    def recovered(self) -> float:
        """Share of the loss increase recovered, in mean NLL (log-perplexity): 1 is the
        baseline, 0 is the ablated model."""
        lost = self.ablated.nll - self.baseline.nll
        return (self.ablated.nll - self.restored.nll) / lost if lost else float("nan")


def super_activations(
    model: TransformerBridge, texts: Sequence[Int[Tensor, "pos"]], coords: Sequence[WeightCoord]
) -> dict[tuple[int, int], float]:
    """(layer, row) -> the largest |hook_mlp_out[:, row]| of each weight's layer over
    `texts`, signed."""
    best: dict[tuple[int, int], float] = {}
    for ids in texts:
        for c, seen in column_maxima(model, ids, coords).items():
            value = seen.value
            key = (c.layer, c.row)
            if abs(value) > abs(best.get(key, 0.0)):
                best[key] = value
    return best


def restore(
    model: TransformerBridge | StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    super_weights: Sequence[WeightCoord],
    texts: Sequence[Int[Tensor, "pos"]],
    fraction: float = 0.1,
) -> Restoration:
    """Baseline, super weights zeroed, and zeroed with the super activations restored
    wherever |unablated output| >= `fraction` x the super activation on `texts`; in
    memory, or streamed from the checkpoint one layer at a time."""
    if not 0 < fraction <= 1:
        raise SwLensError(f"the restore fraction must be in (0, 1], got {fraction}")
    streamed = isinstance(model, StreamedModel)
    measure = row_maxima if streamed else super_activations
    activations = measure(model, texts, super_weights)
    thresholds = {key: fraction * abs(value) for key, value in activations.items()}
    baseline, (ablated,) = rule_model(model).sweep(
        tokens, protocol, corpus, [super_weights], "zeroed"
    )
    if streamed:
        restored = evaluate_restored(model, tokens, protocol, corpus, super_weights, thresholds)
    else:
        restored = evaluate(
            model,
            tokens,
            protocol,
            corpus,
            super_weights,
            restore_above=thresholds,
            desc="restored",
        )
    return Restoration(baseline, ablated, restored, thresholds, activations)
