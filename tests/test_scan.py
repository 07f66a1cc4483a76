"""The streaming scan finds a planted spike exactly and agrees with run_with_cache."""

import pytest
import torch
from conftest import ONE, PROMPT, TRIGGER, byte_tokenizer

from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.scan import scan, scan_with_cache


def prompt_ids(text=PROMPT, bos=False):
    tok = byte_tokenizer()
    return torch.tensor(
        ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]
    )


def test_planted_spike_is_found_at_its_layer_channel_and_token(tiny):
    texts = [prompt_ids("no trigger here"), prompt_ids()]
    result = scan(tiny.bridge, texts, prepend_bos=False)
    spike = result.layers[ONE.layer]
    assert (spike.post.channel, spike.mlp_out.channel) == (ONE.col, ONE.row)
    assert (spike.post.text, spike.post.pos) == (1, PROMPT.index(TRIGGER))
    assert spike.post.token == TRIGGER and spike.mlp_out.token == TRIGGER
    assert spike.post.hook == f"blocks.{ONE.layer}.mlp.hook_post"
    assert spike.mlp_out.hook == f"blocks.{ONE.layer}.mlp.out.hook_out"
    others = [s.mlp_out.magnitude for s in result.layers if s.layer != ONE.layer]
    assert spike.mlp_out.magnitude > 50 * max(others)
    assert not spike.cancels
    assert (result.n_texts, result.n_tokens) == (2, len(texts[0]) + len(texts[1]))


def test_streaming_scan_equals_run_with_cache(tiny):
    texts = [prompt_ids(bos=True), prompt_ids("A tiny A text with two triggers", bos=True)]
    streamed = scan(tiny.bridge, texts, prepend_bos=True)
    cached, caches = scan_with_cache(tiny.bridge, texts, prepend_bos=True)
    assert streamed == cached
    post = caches[0][f"blocks.{ONE.layer}.mlp.hook_post"]
    assert post.shape == (1, len(texts[0]), tiny.bridge.cfg.d_mlp)


def test_every_layer_maximum_matches_an_independent_reduction(tiny):
    ids = prompt_ids("A b A c")
    result = scan(tiny.bridge, [ids], prepend_bos=False)
    with torch.inference_mode():
        _, cache = tiny.bridge.run_with_cache(ids[None])
    for s in result.layers:
        for spike, name in [(s.post, "mlp.hook_post"), (s.mlp_out, "mlp.out.hook_out")]:
            act = cache[f"blocks.{s.layer}.{name}"][0]
            assert spike.magnitude == float(act.abs().max())
            assert spike.value == float(act[spike.pos, spike.channel])


def test_non_finite_activations_name_the_first_layer(tiny):
    def poison(act, hook):
        act[0, 1, 3] = float("inf")
        return act

    with pytest.raises(NonFiniteActivation, match=r"blocks\.2\.mlp\.hook_post has inf/NaN"):
        scan(tiny.bridge, [prompt_ids()], False, fwd_hooks=[("blocks.2.mlp.hook_post", poison)])


def test_empty_texts_are_refused(tiny):
    with pytest.raises(SwLensError, match="at least one token"):
        scan(tiny.bridge, [torch.tensor([], dtype=torch.long)], prepend_bos=False)
    with pytest.raises(SwLensError, match="at least one token"):
        scan(tiny.bridge, [], prepend_bos=False)
