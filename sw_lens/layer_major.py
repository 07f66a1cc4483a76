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
hooks on the down-projection (its input is ``hook_post``, its output ``hook_mlp_out``)
and on the norm before the MLP (its input is ``hook_resid_mid``). The result equals
`scan.scan`'s (positions, channels and tokens; values to float rounding), which the
tests check. Rotary-position decoders without sliding windows (Llama, Mistral, Qwen2,
and their kin) are supported; others get a one-line error naming `scan.scan`.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from sw_lens.errors import SwLensError
from sw_lens.fast import decoder_layers, down_proj_module, hf_twin
from sw_lens.scan import ScanResult, SpikeReducer, check_texts


class _Stop(Exception):
    """Raised by the pre-hook on the first decoder layer once the embedding is captured."""


def _embedding(twin, layers, ids: Tensor) -> Tensor:
    """The residual stream entering the first layer (whatever the model adds to its token
    embeddings), without running any layer."""
    kept = {}

    def capture(module, args, kwargs):
        kept["resid"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        twin(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return kept["resid"]


def _check_supported(twin, n_tokens: int) -> None:
    base = getattr(twin, "model", None)
    window = getattr(twin.config, "sliding_window", None)
    if getattr(base, "rotary_emb", None) is None or (window and window < n_tokens):
        raise SwLensError(
            f"the layer-major scan supports rotary decoders without a sliding window "
            f"shorter than the text ({type(twin).__name__} is not one): use scan.scan"
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
    reducer = SpikeReducer(model)
    device = model.cfg.device
    for text, ids in enumerate(texts):
        _check_supported(twin, len(ids))
        with torch.inference_mode():
            resid = _embedding(twin, layers, ids[None].to(device))
            for index, layer in enumerate(layers):
                _run_layer(model, twin, layer, index, resid, chunk, reducer, text, ids)
    return reducer.result(prepend_bos, texts)


def _run_layer(model, twin, layer, index, resid, chunk, reducer, text, ids) -> None:
    """Run decoder layer `index` over `resid` in chunks, in place, feeding the reducer."""
    n = resid.shape[1]
    cache = DynamicCache(config=twin.config)
    state = {}  # the chunk's first position, and its resid_mid once the norm sees it

    def on_resid_mid(module, args):
        state["resid_mid"] = args[0][0]

    def on_down_proj(module, args, out):
        reducer.update(
            index,
            text,
            ids,
            post=args[0][0],
            mlp_out=out[0],
            resid_mid=state.pop("resid_mid", None),
            offset=state["start"],
        )

    handles = [down_proj_module(model, twin, index).register_forward_hook(on_down_proj)]
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(on_resid_mid))
    try:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            state["start"] = start
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
    finally:
        for handle in handles:
            handle.remove()
