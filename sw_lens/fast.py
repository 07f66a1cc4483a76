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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from types import MappingProxyType

import torch
from accelerate import init_empty_weights
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, PreTrainedModel

from sw_lens.errors import SwLensError
from sw_lens.patching import EditedColumns, edit_hooks
from sw_lens.placement import is_dispatched, share_placement
from sw_lens.vocabulary import down_proj_parameter

_TWINS: "weakref.WeakKeyDictionary[TransformerBridge, PreTrainedModel]" = (
    weakref.WeakKeyDictionary()
)


def empty_model(config) -> PreTrainedModel:
    """The HF class of `config` with its parameters on the meta device (buffers, such as
    rotary frequencies, real), with ``sdpa`` attention where the architecture has it."""
    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError:  # an architecture without sdpa (Gemma 2): its own attention
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def hf_twin(model: TransformerBridge) -> PreTrainedModel:
    """The plain HF model over the bridge's parameters, with ``sdpa`` attention where the
    architecture has it; built once per bridge. A model dispatched by a device map lends
    the twin its own modules and hooks (`placement.share_placement`)."""
    if model in _TWINS:
        return _TWINS[model]
    original = model.original_model
    config = copy.deepcopy(original.config)
    config.__dict__.pop("quantization_config", None)  # GGUF: the weights are dequantized
    twin = empty_model(config)
    if is_dispatched(original):
        missing = share_placement(original, twin)
    else:
        state = {
            name.replace("._original_component", ""): tensor
            for name, tensor in original.state_dict(keep_vars=True).items()
        }
        missing = twin.load_state_dict(state, strict=False, assign=True).missing_keys
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        twin.tie_weights()
        twin.to(model.cfg.device)
    if missing:
        raise SwLensError(f"cannot build the fast evaluation model: missing {missing[:4]}")
    twin.eval()
    _TWINS[model] = twin
    return twin


class _Reached(Exception):
    """Raised by `input_of`'s pre-hook: the input wanted has been seen."""


def input_of(module: nn.Module, forward: Callable[[], object]) -> Tensor:
    """The hidden states `module` receives (its first positional argument, or
    ``hidden_states``) when `forward()` runs; the forward stops there, so nothing from
    `module` on is computed."""
    kept = {}

    def capture(mod, args, kwargs):
        kept["input"] = args[0] if args else kwargs["hidden_states"]
        raise _Reached

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        forward()
    except _Reached:
        pass
    finally:
        handle.remove()
    return kept["input"]


def down_proj_module(model: TransformerBridge, twin: PreTrainedModel, layer: int) -> nn.Module:
    name, _ = down_proj_parameter(model, layer)
    return twin.get_submodule(name.removesuffix(".weight"))


_NAMES: "weakref.WeakKeyDictionary[TransformerBridge, dict[int, list[str]]]" = (
    weakref.WeakKeyDictionary()
)


def twin_module(model: TransformerBridge, twin: PreTrainedModel, component: nn.Module) -> nn.Module:
    """The twin's copy of the HF module a bridge component wraps (e.g.
    ``model.blocks[l].attn.o``: the attention's output projection, whatever the
    architecture calls it)."""
    if model not in _NAMES:
        names: dict[int, list[str]] = {}
        for name, module in model.original_model.named_modules(remove_duplicate=False):
            names.setdefault(id(module), []).append(name.replace("._original_component", ""))
        _NAMES[model] = names
    # The bridge may register a module under its own name too (GPT-2's ``attn.c_proj`` is
    # also ``attn.o``): take the name the twin has.
    for name in _NAMES[model].get(id(component.original_component), []):
        try:
            return twin.get_submodule(name)
        except AttributeError:
            continue
    raise SwLensError(
        f"cannot find {type(component.original_component).__name__} in the fast evaluation model"
    )


@contextmanager
def frozen_parameters(twin: PreTrainedModel) -> Iterator[None]:
    """No parameter requires a gradient while the block runs (a backward pass then
    computes activation gradients only); each flag is put back and ``.grad`` cleared on
    exit. The twin's parameters are the bridge's tensors, so this covers both."""
    params = {p: p.requires_grad for p in twin.parameters()}
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        with torch.inference_mode():  # placeholders of offloaded weights made in it
            for p, flag in params.items():
                p.requires_grad_(flag)
                p.grad = None


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


# Tokens of the short pass that checks resuming (`Resume`): causal, so a prefix suffices.
_CHECK_TOKENS = 32


class Resume:
    """Passes of the twin that run only the decoder layers from `start` on, fed the
    residual stream entering `start` as a full pass computed it: what an edit or patch at
    layer ``start`` or later cannot change is not computed again.

    Only exact where the model adds nothing to ``inputs_embeds`` before its first layer
    (GPT-2 adds position embeddings): `check` replays a short full pass
    from every start and compares bit-for-bit; from a start where that fails, `run`
    computes the whole model instead, with the same result."""

    def __init__(self, model: TransformerBridge, starts: Iterable[int]):
        self.model, self.twin = model, hf_twin(model)
        parent, name = decoder_layers(model, self.twin)
        self.layers = getattr(parent, name)
        self.starts = sorted(set(starts))
        self.exact: dict[int, bool] = {}

    @contextmanager
    def keeping(self) -> Iterator[dict[int, Tensor]]:
        """While the block runs, every forward of the twin records the residual stream
        entering each start layer into the yielded dict (a later forward overwrites)."""
        kept: dict[int, Tensor] = {}

        def keep(module, args, kwargs, layer: int) -> None:
            kept[layer] = args[0] if args else kwargs["hidden_states"]

        handles = [
            self.layers[start].register_forward_pre_hook(
                partial(keep, layer=start), with_kwargs=True
            )
            for start in self.starts
        ]
        try:
            yield kept
        finally:
            for handle in handles:
                handle.remove()

    def check(self, input_ids: Int[Tensor, "batch pos"]) -> None:
        """Decide, once, from which starts a pass may resume (see the class)."""
        if self.exact:
            return
        ids = input_ids[:1, :_CHECK_TOKENS]
        with torch.inference_mode(), self.keeping() as kept:
            logits = self.twin(ids, use_cache=False).logits
        for start in self.starts:
            with torch.inference_mode():
                again = self.run(start, kept, ids, resume=True)
            self.exact[start] = torch.equal(again, logits)

    def run(
        self,
        start: int,
        kept: Mapping[int, Tensor],
        input_ids: Int[Tensor, "batch pos"],
        resume: bool | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the twin (with whatever hooks are on it now) run from layer `start`
        on the residual in `kept`, or from the embeddings where resuming is not exact."""
        if resume if resume is not None else self.exact[start]:
            with layers_from(self.model, self.twin, start):
                return self.twin(inputs_embeds=kept[start], use_cache=False).logits
        return self.twin(input_ids, use_cache=False).logits
