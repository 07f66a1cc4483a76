"""The residual-stream story of the super-activation token: where the massive
activation appears, how long it persists, which layers cancel it, and what the token
predicts on the way (the logit lens: each layer's residual through the final norm and
the unembedding), with the super weights in place and zeroed.

Read on one text in the bridge: ``blocks.{l}.hook_resid_post`` for the stream and
``hook_attn_out`` / ``hook_mlp_out`` for what each sublayer writes into it (after any
post-sublayer norm, i.e. exactly what is added).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.patching import ablation_hooks
from sw_lens.placement import execution_device
from sw_lens.vocabulary import WeightCoord, hook_attn_out, hook_mlp_out, hook_resid_post

# The massive activation is "there" while the channel keeps this share of its peak; a
# sublayer "cancels" it when it writes against it at least this share.
PRESENT, CANCELS = 0.5, 0.25


@dataclass
class ResidualStory:
    position: int  # the super-activation token in the text
    token: str
    row: int  # the super activation's channel in the residual stream
    norm_clean: list[float]  # per layer: |resid_post| at the token
    norm_zeroed: list[float]
    channel_clean: list[float]  # per layer: resid_post[row] at the token
    channel_zeroed: list[float]
    attn_writes: list[float]  # per layer: what attention adds to the channel (clean)
    mlp_writes: list[float]  # per layer: what the MLP adds to the channel (clean)
    lens_clean: list[str]  # per layer: the logit lens's top token at the token
    lens_zeroed: list[str]

    @property
    def peak(self) -> int:
        return max(range(len(self.channel_clean)), key=lambda i: abs(self.channel_clean[i]))

    def present(self) -> list[int]:
        """Layers after which the channel holds at least `PRESENT` of its peak."""
        top = abs(self.channel_clean[self.peak])
        return [i for i, v in enumerate(self.channel_clean) if abs(v) >= PRESENT * top]

    def cancelling(self) -> list[int]:
        """Layers after the peak whose attention + MLP write against the channel's sign
        at least `CANCELS` of its peak."""
        top = self.channel_clean[self.peak]
        return [
            i
            for i in range(self.peak + 1, len(self.channel_clean))
            if -(self.attn_writes[i] + self.mlp_writes[i]) * (1 if top > 0 else -1)
            >= CANCELS * abs(top)
        ]

    def to_dict(self) -> dict:
        return asdict(self) | {
            "peak_layer": self.peak,
            "present_layers": self.present(),
            "cancelling_layers": self.cancelling(),
        }


def _run(
    model: TransformerBridge, ids: Int[Tensor, "1 pos"], position: int, fwd_hooks: list
) -> dict[str, Float[Tensor, "n_layers d_model"]]:
    """Per layer, the residual stream and the two writes at `position`, and the logit
    lens's top token there."""
    n = model.cfg.n_layers
    names = {
        "resid": [hook_resid_post(i) for i in range(n)],
        "attn": [hook_attn_out(i) for i in range(n)],
        "mlp": [hook_mlp_out(i) for i in range(n)],
    }
    wanted = {name for group in names.values() for name in group}
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(ids, names_filter=lambda name: name in wanted)
        lens = execution_device(model.ln_final.original_component)  # layers' may differ
        rows = {
            key: torch.stack([cache[h][0, position].to(lens) for h in group])
            for key, group in names.items()
        }
        logits = model.unembed(model.ln_final(rows["resid"][:, None, :]))[:, 0]
    return rows | {"lens": logits.argmax(-1)}


def residual_story(
    model: TransformerBridge,
    ids: Int[Tensor, "1 pos"],
    position: int,
    coords: Sequence[WeightCoord],
) -> ResidualStory:
    """The story at `position` of `ids`, for the channel of the first of `coords` (the
    strongest super weight), with all of `coords` zeroed for the comparison."""
    row = coords[0].row
    clean = _run(model, ids, position, [])
    zeroed = _run(model, ids, position, ablation_hooks(model, coords))
    decode = model.tokenizer.decode
    return ResidualStory(
        position=position,
        token=decode([int(ids[0, position])]),
        row=row,
        norm_clean=clean["resid"].norm(dim=-1).tolist(),
        norm_zeroed=zeroed["resid"].norm(dim=-1).tolist(),
        channel_clean=clean["resid"][:, row].tolist(),
        channel_zeroed=zeroed["resid"][:, row].tolist(),
        attn_writes=clean["attn"][:, row].tolist(),
        mlp_writes=clean["mlp"][:, row].tolist(),
        lens_clean=[decode([int(t)]) for t in clean["lens"]],
        lens_zeroed=[decode([int(t)]) for t in zeroed["lens"]],
    )
