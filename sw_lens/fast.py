"""Perplexity at the bare model's speed: an unwrapped twin with the fast attention kernel.

The bridge reimplements attention (matmul + softmax) so that ``hook_attn_scores`` and
``hook_pattern`` can fire; measured on SmolLM2-135M on 2 CPU cores that costs 18-23% of
throughput against Hugging Face's ``sdpa``. Perplexity under weight ablations needs no
attention pattern, so `evaluate` runs a *twin*: the plain HF model class built on the
meta device and given the bridge's own parameter tensors (``assign=True``: no copy, no
extra memory, and in-place edits such as `edited_weights` are seen by both). Ablations
are applied by PyTorch forward hooks on the twin's down-projection modules that
recompute the edited output channels exactly as `patching.ablation_hooks` does.

Inside the twin no TransformerLens hook fires; `evaluate` falls back to the bridge (and
eager attention) whenever the caller passes TransformerLens ``fwd_hooks``.
"""

import copy
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType

from accelerate import init_empty_weights
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, PreTrainedModel

from sw_lens.errors import SwLensError
from sw_lens.patching import EditedColumns, edit_hooks
from sw_lens.vocabulary import down_proj_parameter

_TWINS: "weakref.WeakKeyDictionary[TransformerBridge, PreTrainedModel]" = (
    weakref.WeakKeyDictionary()
)


def hf_twin(model: TransformerBridge) -> PreTrainedModel:
    """The plain HF model over the bridge's parameters, with ``sdpa`` attention; built
    once per bridge."""
    if model in _TWINS:
        return _TWINS[model]
    original = model.original_model
    config = copy.deepcopy(original.config)
    config.__dict__.pop("quantization_config", None)  # GGUF: the weights are dequantized
    with init_empty_weights():  # parameters on the meta device, buffers (rotary) real
        twin = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = {
        name.replace("._original_component", ""): tensor
        for name, tensor in original.state_dict(keep_vars=True).items()
    }
    missing = twin.load_state_dict(state, strict=False, assign=True).missing_keys
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing:
        raise SwLensError(f"cannot build the fast evaluation model: missing {missing[:4]}")
    twin.tie_weights()
    twin.to(model.cfg.device).eval()
    _TWINS[model] = twin
    return twin


def down_proj_module(model: TransformerBridge, twin: PreTrainedModel, layer: int) -> nn.Module:
    name, _ = down_proj_parameter(model, layer)
    return twin.get_submodule(name.removesuffix(".weight"))


@contextmanager
def twin_ablation(
    model: TransformerBridge, edits: Mapping[int, EditedColumns]
) -> Iterator[PreTrainedModel]:
    """The twin, with `edits` (`patching.column_edits`) applied to its down-projections
    while the block runs; the hooks are removed on exit, whatever happened."""
    twin = hf_twin(model)
    handles = []
    try:
        for layer, edit in edits.items():
            module = down_proj_module(model, twin, layer)
            handles.append(
                module.register_forward_hook(lambda mod, args, out, e=edit: e.apply(args[0], out))
            )
        yield twin
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def forward_pass(
    model: TransformerBridge,
    edits: Mapping[int, EditedColumns] = MappingProxyType({}),
    fwd_hooks: Sequence = (),
) -> Iterator[tuple[Callable[[Tensor], Tensor], Sequence[nn.Module]]]:
    """The one place that picks how a forward pass runs: the HF twin (``sdpa``) when no
    TransformerLens hook has to fire, else the bridge (eager attention) with the edits as
    hooks followed by `fwd_hooks`. Yields ``(logits_of, layers)``: ``logits_of(input_ids)``
    gives [batch, pos, d_vocab] logits with `edits` (`patching.column_edits`) applied, and
    `layers` are the decoder layers it runs, for progress."""
    if fwd_hooks:
        with model.hooks(fwd_hooks=[*edit_hooks(edits), *fwd_hooks]):
            yield (lambda ids: model(ids, return_type="logits")), model.blocks
    else:
        with twin_ablation(model, edits) as twin:
            yield (lambda ids: twin(ids).logits), getattr(*decoder_layers(model, twin))


def decoder_layers(model: TransformerBridge, twin: PreTrainedModel) -> tuple[nn.Module, str]:
    """The module holding the twin's list of decoder layers, and that list's attribute
    name (``model.layers`` for Llama-like models, ``transformer.h`` for GPT-2)."""
    first = down_proj_module(model, twin, 0)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == model.cfg.n_layers:
                if any(m is first for m in child[0].modules()):
                    return parent, name
    raise SwLensError("cannot find the decoder layers of the fast evaluation model")


@contextmanager
def layers_from(model: TransformerBridge, twin: PreTrainedModel, start: int) -> Iterator[None]:
    """While the block runs, the twin's forward runs only layers ``start..n``, taking
    ``inputs_embeds`` as the residual stream entering layer `start`. Only valid where the
    model adds nothing to ``inputs_embeds`` before its first layer: `prefix_forward`
    checks that on real data before relying on it."""
    parent, name = decoder_layers(model, twin)
    layers = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, layers)
