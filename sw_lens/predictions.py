"""Top-k next-token predictions, with and without an ablation.

The paper's case study: "Summer is hot. Winter is" -> "cold" (81%) in Llama-7B becomes
"the" (9%) once the super weight is zeroed. This puts the same comparison in the results
for any model.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.fast import forward_pass
from sw_lens.patching import column_edits
from sw_lens.vocabulary import WeightCoord

CASE_STUDY_PROMPT = "Summer is hot. Winter is"


@dataclass(frozen=True)
class Accuracy:
    """Next-word accuracy with what it rests on (`documents.Accuracy`)."""

    correct: int
    n_prompts: int
    share: float


def top_predictions(
    model: TransformerBridge, ids: Int[Tensor, "pos"], k: int = 5, fwd_hooks: Sequence = ()
) -> list[dict]:
    """The k most likely next tokens after `ids`, with their probabilities."""
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
        logits = model(ids[None].to(model.cfg.device), return_type="logits")[0, -1]
    return top_tokens(model.tokenizer, logits, k)


def top_tokens(tokenizer, logits: Float[Tensor, "d_vocab"], k: int) -> list[dict]:
    """The k most likely tokens of one position's `logits`, with their probabilities."""
    top = logits.float().softmax(-1).topk(k)
    return [
        {"token": tokenizer.decode([int(i)]), "token_id": int(i), "prob": float(p)}
        for p, i in zip(top.values, top.indices, strict=True)
    ]


def next_token_logits(
    model: TransformerBridge,
    contexts: Sequence[Int[Tensor, "pos"]],
    ablation: Sequence[WeightCoord] = (),
    scale: float = 0.0,
) -> list[Float[Tensor, "d_vocab"]]:
    """The logits after each of `contexts` (on the CPU), with each weight in `ablation`
    multiplied by `scale` (`fast.forward_pass` picks the fast twin)."""
    edits = column_edits(model, ablation, scale)
    with torch.inference_mode(), forward_pass(model, edits) as (logits_of, _):
        return [logits_of(ids[None].to(model.cfg.device))[0, -1].cpu() for ids in contexts]


def accuracy(logits: Sequence[Float[Tensor, "d_vocab"]], targets: Sequence[int]) -> Accuracy:
    """How many of the next-token `logits` rank their target first (e.g. the first token
    of a held-out last word, as LAMBADA scores)."""
    hits = sum(int(x.argmax()) == t for x, t in zip(logits, targets, strict=True))
    return Accuracy(hits, len(targets), hits / len(targets))
