"""The layer-major scan equals the streaming scan, chunk size aside."""

import pytest
from conftest import TWO, build, save

from sw_lens.errors import SwLensError
from sw_lens.layer_major import scan_layer_major
from sw_lens.models import load_model
from sw_lens.scan import scan
from sw_lens.setup import prompt_tokens

TEXTS = ["xyz A qrs and a longer text with A inside it, and more after that", "A b c"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 7, 128])
def test_layer_major_scan_equals_the_streaming_scan(tmp_path, arch, chunk):
    loaded = load_model(str(save(build(arch, TWO), tmp_path / arch)), device="cpu")
    texts = prompt_tokens(loaded, TEXTS, True)
    streamed = scan(loaded.bridge, texts, True)
    chunked = scan_layer_major(loaded.bridge, texts, True, chunk=chunk)
    assert (chunked.n_texts, chunked.n_tokens) == (streamed.n_texts, streamed.n_tokens)
    for a, b in zip(streamed.layers, chunked.layers, strict=True):
        for x, y in ((a.post, b.post), (a.mlp_out, b.mlp_out)):
            assert (y.hook, y.text, y.pos, y.channel, y.token) == (
                x.hook,
                x.text,
                x.pos,
                x.channel,
                x.token,
            )
            assert y.value == pytest.approx(x.value, rel=1e-4)
        assert b.resid_mid == pytest.approx(a.resid_mid, rel=1e-4, abs=1e-4)
        assert b.cancels == a.cancels
    assert max(s.mlp_out.magnitude for s in chunked.layers) > 1e3  # the planted spike


def test_other_architectures_get_one_line(tiny_dir, arch):
    loaded = load_model(str(tiny_dir), device="cpu")
    texts = prompt_tokens(loaded, ["xyz A qrs"], False)
    if arch == "gpt2":
        with pytest.raises(SwLensError, match="layer-major scan supports rotary decoders"):
            scan_layer_major(loaded.bridge, texts, False)
    else:
        assert scan_layer_major(loaded.bridge, texts, False).layers[1].mlp_out.channel == 5
