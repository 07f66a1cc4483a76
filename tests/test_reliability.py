"""Interrupted runs lose nothing, untrusted files execute nothing, results reproduce,
models that cannot fit are refused before loading, and the locator finds any plant."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ARCHS, ONE, PROMPT, REPO, Plant, build, byte_tokenizer, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sw_lens import resources
from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.locate import locate
from sw_lens.locate_job import run_locate
from sw_lens.models import load_model
from sw_lens.nanogpt import checkpoint_weight
from sw_lens.patching import edited_weights
from sw_lens.scan import scan
from sw_lens.setup import LocateConfig
from sw_lens.vocabulary import WeightCoord, down_proj_parameter

CORPUS = "Interrupt me while I am scoring A tokens. " * 40


def test_sigint_during_perplexity_exits_130_and_writes_nothing(tmp_path):
    model = save(build("llama", [ONE]), tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 60)  # ~100k tokens: several seconds of scoring
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "experiments" / "locate.py"),
            "--model",
            str(model),
            "--text",
            str(corpus),
            "--window",
            "128",
            "--max-tokens",
            "100000",
            "--rank-tokens",
            "128",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:  # wait until the reported perplexity loop has started
        lines.append(line)
        if line.startswith("perplexity on"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert "interrupted: no results were written" in rest
    assert "Traceback" not in rest
    assert not (out / "results.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_remote_code_is_not_run_without_the_flag(tmp_path):
    marker = tmp_path / "executed"
    model_dir = save(build("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "evil"  # only its own code knows this architecture
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig): pass\n"
    )
    with pytest.raises(SwLensError, match="cannot load") as err:
        load_model(str(model_dir), device="cpu")
    assert "--trust-remote-code only if you trust it" in str(err.value)
    assert not marker.exists()


def test_remote_code_runs_with_the_flag_through_the_memory_check(tmp_path):
    """A model whose config and model classes live in its own files loads with
    --trust-remote-code: the memory check builds it from the config with the same trust."""
    model_dir = save(build("llama", [ONE]), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "custom_llama"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
    )
    (model_dir / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n"
        "from .configuration_custom import CustomConfig\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    loaded = load_model(str(model_dir), device="cpu", trust_remote_code=True)
    assert type(loaded.bridge.original_model).__name__ == "CustomForCausalLM"
    ids = torch.tensor(byte_tokenizer()(PROMPT)["input_ids"])
    (found,) = locate(loaded.bridge, [ids], prepend_bos=False).candidates
    assert (found.coord.layer, found.coord.row, found.coord.col) == (ONE.layer, ONE.row, ONE.col)


def test_a_float16_overflow_is_reported_at_its_first_layer(tmp_path):
    big = Plant(layer=1, row=5, col=17, dim=3, value=300.0)  # 300 x 511 > float16's 65504
    loaded = load_model(str(save(build("llama", [big]), tmp_path / "m")), "cpu", "float16")
    ids = torch.tensor(byte_tokenizer()(PROMPT)["input_ids"])
    with pytest.raises(NonFiniteActivation, match=r"blocks\.1\.mlp\.out\.hook_out .* bfloat16"):
        scan(loaded.bridge, [ids], prepend_bos=False)


def test_two_runs_give_identical_results_apart_from_the_timestamp(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    config = LocateConfig(
        model=str(save(build("qwen2", [ONE]), tmp_path / "m")),
        text=str(corpus),
        prompts=["xyz A qrs"],
        device="cpu",
        window=64,
        max_tokens=256,
        rank_tokens=128,
        html_tokens=32,
    )
    first, second = (json.loads(run_locate(config).to_json()) for _ in range(2))
    for doc in (first, second):
        doc["provenance"].pop("created")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert {"seed", "versions", "device", "dtype", "git_commit"} <= set(first["provenance"])


def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    model_dir = save(build("llama"), tmp_path / "m")
    monkeypatch.setattr(resources, "available_bytes", lambda device: 10_000)
    with pytest.raises(SwLensError, match=r"~0\.0 GiB in float32 but 0\.0 GiB is free on cpu"):
        load_model(str(model_dir), device="cpu")
    with pytest.raises(SwLensError, match=r"stream it \(--stream on\) or spread it over GPUs"):
        load_model(str(model_dir), device="cpu", dtype="bfloat16")  # nothing smaller to try
    n = resources.parameter_count(build("llama").config)
    assert n == sum(p.numel() for p in build("llama").parameters())
    monkeypatch.setattr(resources, "available_bytes", lambda device: int(n * 3))
    with pytest.raises(SwLensError, match="try --dtype bfloat16"):
        load_model(str(model_dir), device="cpu")


# Property-based: coordinates survive every layout, and any plant is found exactly.


@settings(max_examples=25, deadline=None)
@given(
    layer=st.integers(0, 5),
    row=st.integers(0, 31),
    col=st.integers(0, 47),
    arch=st.sampled_from(ARCHS),
)
def test_coordinates_convert_between_layouts(loaded_models, layer, row, col, arch):
    bridge = loaded_models[arch].bridge
    name, transposed = down_proj_parameter(bridge, layer)
    param = bridge.original_model.get_parameter(name)
    hf_index = (row, col) if transposed else (col, row)
    coord = WeightCoord(layer, row, col)
    with edited_weights(bridge, [coord], scale=0.0):
        assert float(param.detach()[hf_index]) == 0.0
        w_layer, w_col, w_row = coord.w_out_index
        assert float(bridge.blocks[w_layer].mlp.W_out.detach()[w_col, w_row]) == 0.0
    assert checkpoint_weight(layer, row, col) == (
        f"transformer.h.{layer}.mlp.c_proj.weight",
        (row, col),
    )


@pytest.fixture(scope="module")
def loaded_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {a: load_model(str(save(build(a), tmp / a)), device="cpu") for a in ARCHS}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arch=st.sampled_from(ARCHS),
    layer=st.integers(0, 5),
    row=st.integers(0, 31),
    col=st.integers(0, 47),
    dim=st.integers(0, 31),
    seed=st.integers(0, 10_000),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_any_single_plant_is_found_at_its_coordinates(
    tmp_path, arch, layer, row, col, dim, seed, sign
):
    plant = Plant(layer=layer, row=row, col=col, dim=dim, value=sign * 8.0)
    loaded = load_model(str(save(build(arch, [plant], seed=seed), tmp_path / f"m{seed}")), "cpu")
    ids = torch.tensor(byte_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"])
    (found,) = locate(loaded.bridge, [ids], prepend_bos=False).candidates
    assert found.coord == WeightCoord(layer, row, col) and found.value == sign * 8.0
