"""Top-k next-token predictions, with and without an ablation.

The paper's case study: "Summer is hot. Winter is" -> "cold" (81%) in Llama-7B becomes
"the" (9%) once the super weight is zeroed. This puts the same comparison in the results
for any model.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

CASE_STUDY_PROMPT = "Summer is hot. Winter is"


def top_predictions(
    model: TransformerBridge, ids: Int[Tensor, "pos"], k: int = 5, fwd_hooks: Sequence = ()
) -> list[dict]:
    """The k most likely next tokens after `ids`, with their probabilities."""
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
        logits = model(ids[None].to(model.cfg.device), return_type="logits")[0, -1]
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    return [
        {"token": model.tokenizer.decode([int(i)]), "token_id": int(i), "prob": float(p)}
        for p, i in zip(top.values, top.indices, strict=True)
    ]
