"""A scan in about one layer's memory: run the model layer by layer, positions in chunks.

`scan.scan` runs each text through the whole model at once, so its peak memory is a
forward pass's: every layer's attention scores and MLP intermediates for all positions
(18-32x one ``hook_post`` measured on SmolLM2 and Qwen2.5-3B). For long texts,
`scan_layer_major` keeps only the residual stream between layers. Each decoder layer of
the model's HF twin (`sw_lens.fast`: the same parameter tensors) runs over the text in
chunks of `chunk` positions: its own attention module reads the keys and values of all
earlier chunks from a cache that holds this one layer only, and the layer's output
overwrites the chunk's rows of the residual stream (later chunks need only their own
rows and the cached keys and values). Peak memory is then the residual stream, one
layer's keys and values, and one chunk's attention scores and MLP activations.

The reduction is the same `scan.SpikeReducer` as the streaming scan, fed per chunk by module
hooks on the down-projection (its input is ``hook_post``, its output the down-projection
output that `scan.scan` reads), on the module whose input is ``hook_resid_mid`` and on
any norm after the MLP (its output is ``hook_mlp_out``; see `mlp_sublayer`). The result equals
`scan.scan`'s (positions, channels and tokens; values to float rounding), which the
tests check. Rotary-position decoders without sliding windows (Llama, Mistral, Qwen2,
and their kin) are supported; others, and any model whose layers a short chunked run
does not reproduce, get a one-line error naming `scan.scan`.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from sw_lens.errors import SwLensError
from sw_lens.fast import decoder_layers, down_proj_module, hf_twin, input_of
from sw_lens.scan import ScanResult, SpikeReducer, check_texts


def _embedding(twin, layers, ids: Tensor) -> Tensor:
    """The residual stream entering the first layer (whatever the model adds to its token
    embeddings), without running any layer."""
    return input_of(layers[0], lambda: twin(ids, use_cache=False))


def _check_supported(twin, n_tokens: int) -> None:
    base = getattr(twin, "model", None)
    window = getattr(twin.config, "sliding_window", None)
    if getattr(base, "rotary_emb", None) is None or (window and window < n_tokens):
        raise SwLensError(
            f"the layer-major scan supports rotary decoders without a sliding window "
            f"shorter than the text ({type(twin).__name__} is not one): use scan.scan"
        )


_PROBE = 8  # tokens of the check that running layers in chunks reproduces the model


def _check_reproduced(model, twin, layers, ids: Tensor) -> None:
    """Refuse, in one line, a model whose layers this scan does not reproduce (Gemma 2
    and 3 alternate sliding and global attention, which a chunked call does not set up):
    the residual stream after every layer but the last, run in two chunks over the
    text's first tokens, must match the model's own forward."""
    probe = ids[:_PROBE].to(model.cfg.device)
    with torch.inference_mode():
        hidden = twin(probe[None], output_hidden_states=True, use_cache=False).hidden_states
        resid = _embedding(twin, layers, probe[None])
        for index, layer in enumerate(list(layers)[:-1]):
            try:
                reducer = SpikeReducer(model.cfg.n_layers, model.tokenizer)
                _run_layer(model, twin, layer, index, resid, _PROBE // 2, reducer, 0, probe)
                reproduced = torch.allclose(resid, hidden[index + 1], rtol=1e-4, atol=1e-5)
            except (TypeError, ValueError, RuntimeError):  # a layer that needs more arguments
                reproduced = False
            if not reproduced:
                raise SwLensError(
                    f"the layer-major scan does not reproduce layer {index} of "
                    f"{type(twin).__name__} when run in chunks: use scan.scan"
                )


def scan_layer_major(
    model: TransformerBridge,
    texts: Sequence[Int[Tensor, "pos"]],
    prepend_bos: bool,
    chunk: int = 128,
) -> ScanResult:
    """`scan.scan` (without ablations), one layer at a time over `chunk`-position pieces."""
    check_texts(texts)
    if chunk < 1:
        raise SwLensError(f"chunk must be positive, got {chunk}")
    twin = hf_twin(model)
    parent, name = decoder_layers(model, twin)
    layers = getattr(parent, name)
    reducer = SpikeReducer(model.cfg.n_layers, model.tokenizer)
    device = model.cfg.device
    for ids in texts:  # every refusal before any work
        _check_supported(twin, len(ids))
    _check_reproduced(model, twin, layers, texts[0])  # a property of the model: once
    for text, ids in enumerate(texts):
        with torch.inference_mode():
            resid = _embedding(twin, layers, ids[None].to(device))
            for index, layer in enumerate(layers):
                _run_layer(model, twin, layer, index, resid, chunk, reducer, text, ids)
    return reducer.result(prepend_bos, texts)


def mlp_sublayer(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(a module whose input is the residual stream entering the MLP sublayer, a norm
    applied to the MLP's output before it is added, or None). Llama-like layers read
    ``post_attention_layernorm``'s input (GPT-2: ``ln_2``'s); Gemma 2/3 normalise before
    and after the MLP (there ``post_attention_layernorm`` follows the attention); OLMo 2
    feeds the residual to the MLP directly and normalises its output. A parallel layer
    (GPT-NeoX) has no such stream: its MLP reads the layer's input, as the bridge, which
    has no ``hook_resid_mid`` there, says too."""
    if getattr(layer, "use_parallel_residual", False):
        return None, None
    after = getattr(layer, "post_feedforward_layernorm", None)
    before = getattr(layer, "pre_feedforward_layernorm", None)
    if before is None and after is not None:
        before = layer.mlp
    for name in ("post_attention_layernorm", "ln_2"):  # GPT-2 calls it ln_2
        before = before if before is not None else getattr(layer, name, None)
    return before, after


def _run_layer(model, twin, layer, index, resid, chunk, reducer, text, ids) -> None:
    """Run decoder layer `index` over `resid` in chunks, in place, feeding the reducer."""
    n = resid.shape[1]
    cache = DynamicCache(config=twin.config)
    state = {}  # one chunk's activations, as the layer's modules see them

    def keep(key: str, tensor: Tensor) -> None:
        state[key] = tensor[0]

    before, after = mlp_sublayer(layer)
    down = down_proj_module(model, twin, index)
    handles = [
        down.register_forward_hook(lambda m, args, out: state.update(post=args[0][0], down=out[0]))
    ]
    if before is not None:
        handles.append(before.register_forward_pre_hook(lambda m, args: keep("resid_mid", args[0])))
    if after is not None:
        handles.append(after.register_forward_hook(lambda m, args, out: keep("added", out)))
    try:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            positions = torch.arange(start, end, device=resid.device)[None]
            keys = torch.arange(end, device=resid.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]  # causal, offset
            out = layer(
                resid[:, start:end],
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=twin.model.rotary_emb(resid[:, start:end], positions),
                cache=cache,
                use_cache=True,
            )
            resid[:, start:end] = out[0] if isinstance(out, tuple) else out
            reducer.update(
                index,
                text,
                ids,
                post=state.pop("post"),
                mlp_out=state.pop("down"),
                resid_mid=state.pop("resid_mid", None),
                added=state.pop("added", None),
                offset=start,
            )
    finally:
        for handle in handles:
            handle.remove()
