"""Layer-streamed runs read a checkpoint one decoder layer at a time; what they read is
checked first, and a model too large to load in memory still runs. (Equality with the
in-memory scan and perplexity on every family: tests/test_coverage.py.)"""

import json
from collections import Counter
from dataclasses import astuple

import pytest
import torch
from conftest import (
    LOCATE_CORPUS,
    ONE,
    PROMPT,
    TOY,
    build,
    byte_tokenizer,
    hf_cache_snapshot,
    run_experiment,
    run_in_process,
    save,
)
from safetensors.torch import load_file, save_file

from sw_lens import resources
from sw_lens.errors import SwLensError
from sw_lens.experiment import prepare
from sw_lens.models import load_model
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.results import read_json
from sw_lens.setup import LocateConfig
from sw_lens.stream import (
    StreamedModel,
    check_streamable,
    evaluate_streamed,
    scan_streamed,
    streaming_bytes,
)
from sw_lens.studies import (
    ControlsOptions,
    QuantizeOptions,
    RestoreOptions,
    ScalingOptions,
    StopwordsOptions,
    controls_study,
    quantize_study,
    restore_study,
    scaling_study,
    stopwords_study,
)
from sw_lens.vocabulary import WeightCoord

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)
TOY_WEIGHT = WeightCoord(TOY.layer, TOY.row, TOY.col)
TOKENS = torch.randint(0, 255, (128,), generator=torch.Generator().manual_seed(1))
PROTOCOL = Protocol(window=32, batch_size=2)


def streamed(path) -> StreamedModel:
    return StreamedModel(path, byte_tokenizer(), torch.device("cpu"), torch.float32)


def rewrite(path, change) -> None:
    """Apply `change` to the checkpoint's tensors (a dict) and save them back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_checkpoint_missing_a_layer_fails_before_any_compute_naming_it(tmp_path):
    path = save(build("llama", [ONE]), tmp_path / "m")
    rewrite(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(SwLensError, match="lacks layer 2's tensor 'model.layers.2.mlp.up_proj"):
        streamed(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 7), "cannot read the"),
        (lambda p: (p / "model.safetensors").unlink(), "has no safetensors weights"),
    ],
)
def test_an_unreadable_checkpoint_is_one_line(tmp_path, damage, message):
    path = save(build("llama", [ONE]), tmp_path / "m")
    damage(path)
    with pytest.raises(SwLensError, match=message) as refused:
        streamed(path)
    assert "\n" not in str(refused.value)


def test_a_tensor_of_the_wrong_shape_is_one_line(tmp_path):
    path = save(build("llama", [ONE]), tmp_path / "m")
    rewrite(path, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(3, 3)}))
    model = streamed(path)
    with pytest.raises(SwLensError, match=r"down_proj.weight' in the checkpoint is \(3, 3\)"):
        evaluate_streamed(model, TOKENS, PROTOCOL, "t")


def test_a_sharded_checkpoint_streams_the_same_numbers(tmp_path):
    model = build("qwen2", [ONE])
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = load_model(str(path), device="cpu")
    baseline, (ablated,) = evaluate_streamed(streamed(path), TOKENS, PROTOCOL, "t", [[PLANTED]])
    assert baseline.nll == pytest.approx(evaluate(loaded.bridge, TOKENS, PROTOCOL, "t").nll, 1e-5)
    expected = evaluate(loaded.bridge, TOKENS, PROTOCOL, "t", [PLANTED])
    assert ablated.nll == pytest.approx(expected.nll, rel=1e-5)
    assert ablated.nll != baseline.nll  # the ablation reached the shards' weights


def test_a_gpt2_checkpoint_without_its_base_prefix_streams(tmp_path):
    """The hub's gpt2 stores ``h.0.attn...``, not ``transformer.h.0.attn...``."""
    path = save(build("gpt2", [ONE]), tmp_path / "m")
    loaded = load_model(str(path), device="cpu")
    expected = evaluate(loaded.bridge, TOKENS, PROTOCOL, "t", [PLANTED])
    rewrite(
        path,
        lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}),
    )
    _, (ablated,) = evaluate_streamed(streamed(path), TOKENS, PROTOCOL, "t", [[PLANTED]])
    assert ablated.nll == pytest.approx(expected.nll, rel=1e-5)


def test_a_model_that_cannot_load_in_memory_still_streams(tmp_path, monkeypatch):
    """With free memory set between what streaming needs and what loading the whole
    model needs, loading refuses in one line and the streamed run completes, with the
    numbers the in-memory run gives."""
    path = save(build("llama", [ONE]), tmp_path / "m")
    protocol = Protocol(window=32, batch_size=1)  # a tiny model's activations rival it
    expected = evaluate(load_model(str(path), device="cpu").bridge, TOKENS, protocol, "t")
    model = streamed(path)
    need = streaming_bytes(model, len(TOKENS), protocol.window, protocol.batch_size)
    whole = resources.parameter_count(model.config) * 4 * resources.OVERHEAD
    assert need < whole
    monkeypatch.setattr(resources, "available_bytes", lambda device: (need + whole) // 2)
    with pytest.raises(SwLensError, match="GiB is free on cpu"):
        load_model(str(path), device="cpu")
    check_streamable(model, len(TOKENS), protocol.window, protocol.batch_size)
    baseline, _ = evaluate_streamed(model, TOKENS, protocol, "t")
    assert baseline.nll == pytest.approx(expected.nll, rel=1e-5)
    monkeypatch.setattr(resources, "available_bytes", lambda device: need - 1)
    with pytest.raises(SwLensError, match="streaming needs ~.* GiB .* is free on cpu"):
        check_streamable(model, len(TOKENS), protocol.window, protocol.batch_size)


def test_streaming_reads_each_layer_once_per_pass_and_leaves_none_loaded(tmp_path):
    path = save(build("llama", [ONE]), tmp_path / "m")
    model = streamed(path)
    reads = []
    tensor = model.checkpoint.tensor
    model.checkpoint.tensor = lambda name: reads.append(name) or tensor(name)
    evaluate_streamed(model, TOKENS, PROTOCOL, "t", [[PLANTED], [WeightCoord(3, 0, 0)]])
    down = [n for n in reads if n.endswith("mlp.down_proj.weight")]
    n = model.n_layers  # the baseline reads every layer; each ablation from its own on
    expected = Counter([*range(n), *range(PLANTED.layer, n), *range(3, n)])
    assert Counter(int(name.split(".")[2]) for name in down) == expected
    assert all(p.device.type == "meta" for layer in model.layers for p in layer.parameters())
    scan_streamed(model, [TOKENS[:16]], prepend_bos=False)
    assert all(p.device.type == "meta" for layer in model.layers for p in layer.parameters())


def test_coordinates_outside_the_model_are_refused_before_any_read(tmp_path):
    model = streamed(save(build("llama", [ONE]), tmp_path / "m"))
    with pytest.raises(SwLensError, match=r"layer 9 down_proj.weight\[0, 0\] is out of range"):
        evaluate_streamed(model, TOKENS, PROTOCOL, "t", [[WeightCoord(9, 0, 0)]])


def run_locate(model, corpus, out, *args):
    return run_experiment(
        "locate.py",
        *("--model", model, "--text", corpus, "--prompt", PROMPT, "--device", "cpu"),
        *("--window", "32", "--max-tokens", "128", "--rank-tokens", "64", "--find", "rule"),
        *("--min-ppl-ratio", "0", "--out", out, *args),
    )


def test_locate_streams_on_request_and_finds_what_memory_finds(tmp_path):
    model = save(build("llama", [ONE]), tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LOCATE_CORPUS)
    documents = {}
    for stream in ("on", "off"):
        done = run_locate(model, corpus, tmp_path / stream, "--stream", stream)
        assert done.returncode == 0, done.stderr
        documents[stream] = read_json(tmp_path / stream / "results.json", "locate")
    streamed, in_memory = documents["on"], documents["off"]
    assert streamed.execution.streamed and not in_memory.execution.streamed
    assert (
        [c.key() for c in streamed.candidates]
        == [astuple(PLANTED)]
        == [c.key() for c in in_memory.candidates]
    )
    assert streamed.candidates[0].value == in_memory.candidates[0].value
    assert streamed.candidates[0].checkpoint_param == "model.layers.1.mlp.down_proj.weight"
    for a, b in zip(
        [streamed.perplexity.baseline, *streamed.perplexity.ablations],
        [in_memory.perplexity.baseline, *in_memory.perplexity.ablations],
        strict=True,
    ):
        assert a.nll == pytest.approx(b.nll, rel=1e-5)
    tokens = [[p.token for p in d.predictions.after] for d in (streamed, in_memory)]
    assert tokens[0] == tokens[1]
    assert streamed.layer_activations == [] and streamed.weight_distributions == []
    assert (tmp_path / "on" / "perplexity.png").is_file()


def test_auto_streams_a_model_that_does_not_fit(tmp_path, monkeypatch):
    model = save(build("llama", [ONE]), tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LOCATE_CORPUS)
    whole = resources.parameter_count(build("llama").config) * 4 * resources.OVERHEAD
    need = streaming_bytes(streamed(model), n_tokens=128, window=32, batch_size=1)  # as run
    assert need < whole
    monkeypatch.setattr(resources, "available_bytes", lambda device: (need + whole) / 2)
    done = run_in_process(
        "locate.py",
        *("--model", model, "--text", corpus, "--prompt", PROMPT, "--device", "cpu"),
        *("--window", "32", "--max-tokens", "128", "--rank-tokens", "64", "--batch-size", "1"),
        *("--out", tmp_path / "o"),
    )
    assert done.returncode == 0, done.stderr
    document = read_json(tmp_path / "o" / "results.json", "locate")
    assert document.execution.streamed and "does not fit cpu whole" in document.execution.why
    assert [c.key() for c in document.candidates] == [astuple(PLANTED)]
    assert any("streamed: the threshold-free search needs gradients" in n for n in document.notes)
    assert "streamed (the model does not fit cpu whole" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--check-known"], "--check-known needs the model in memory"),
        (["--model", "weights.gguf"], "cannot stream"),  # not a GGUF file inside
        (["--model", "ckpt.pt"], "is neither an HF-format folder of safetensors nor a .gguf"),
    ],
)
def test_what_cannot_stream_is_one_line(tmp_path, args, message):
    model = save(build("llama", [ONE]), tmp_path / "m")
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    (tmp_path / "ckpt.pt").write_bytes(b"PK")
    args = [str(tmp_path / a) if a.endswith((".gguf", ".pt")) else a for a in args]
    done = run_in_process(
        "locate.py",
        "--model",
        model,
        "--stream",
        "on",
        "--window",
        "32",
        "--out",
        tmp_path / "o",
        *args,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "o").exists()


def test_a_hub_id_streams_offline_from_the_hf_cache(tmp_path):
    hf_cache_snapshot(tmp_path / "hf", "sw-lens-test/tiny-qwen", build("qwen2", [ONE]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LOCATE_CORPUS)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = run_experiment(
        "locate.py",
        *("--model", "sw-lens-test/tiny-qwen", "--text", corpus, "--prompt", PROMPT),
        *("--window", "32", "--max-tokens", "128", "--rank-tokens", "64", "--device", "cpu"),
        *("--stream", "on", "--out", tmp_path / "out"),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    document = read_json(tmp_path / "out" / "results.json", "locate")
    assert document.model.source == "hub" and document.execution.streamed
    assert [c.key() for c in document.candidates] == [astuple(PLANTED)]


def streamed_and_in_memory(toy, study, options):
    """`study`'s document on the toy model, streamed and in memory."""
    documents = []
    for stream in ("on", "off"):
        config = LocateConfig(
            model=str(toy),
            text=str(toy / "corpus.txt"),
            device="cpu",
            window=32,
            max_tokens=256,
            weights=[TOY_WEIGHT],
            stream=stream,
        )
        documents.append(study(prepare(config, streamable=True), options))
    streamed, in_memory = documents
    assert streamed.execution.streamed and streamed.execution.why == "--stream on"
    assert not in_memory.execution.streamed
    assert streamed.super_weights[0].value == in_memory.super_weights[0].value == TOY.value
    return streamed, in_memory


def test_controls_stream_and_give_the_in_memory_table(toy):
    """Controls (a)-(e) streamed: the largest weights and the magnitude-matched draws
    read layer by layer from the checkpoint, each row's perplexity a streamed sweep."""
    options = ControlsOptions(n_largest=40, draws=2, scales=[0.5, 2.0])
    streamed, in_memory = streamed_and_in_memory(toy, controls_study, options)
    assert streamed.baseline.nll == pytest.approx(in_memory.baseline.nll, rel=1e-6)
    for a, b in zip(streamed.controls, in_memory.controls, strict=True):
        assert (a.label, a.n_weights) == (b.label, b.n_weights)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6), a.label
    assert streamed.summary.largest_min_abs == in_memory.summary.largest_min_abs
    share = 40 / (3 * 48 * 32)  # of the toy's down-projection weights: 3 layers, 48 x 32
    assert streamed.summary.largest_share == in_memory.summary.largest_share == share


def test_scaling_streams_its_perplexities_and_next_word_accuracy(toy):
    options = ScalingOptions(factors=[0.0, 0.5, 2.0], task_prompts=12)
    streamed, in_memory = streamed_and_in_memory(toy, scaling_study, options)
    for a, b in zip(streamed.scaling, in_memory.scaling, strict=True):
        assert a.scale == b.scale and a.accuracy == b.accuracy
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6), a.scale
    assert streamed.scaling[0].perplexity > 2 * streamed.baseline.perplexity  # x0 hurts


def test_stopwords_stream_their_class_masses_and_case_study(toy):
    options = StopwordsOptions(prompts="corpus", n_prompts=15)
    streamed, in_memory = streamed_and_in_memory(toy, stopwords_study, options)
    for name, mass in streamed.classes.items():
        other = in_memory.classes[name]
        assert mass.before == pytest.approx(other.before, rel=1e-5, abs=1e-7), name
        assert mass.after == pytest.approx(other.after, rel=1e-5, abs=1e-7), name
    for when in ("before", "after"):
        a, b = getattr(streamed.case_study, when), getattr(in_memory.case_study, when)
        assert [p.token_id for p in a] == [p.token_id for p in b]
        assert [p.prob for p in a] == pytest.approx([p.prob for p in b], rel=1e-5)


def test_an_experiment_that_needs_the_whole_model_refuses_stream_on(toy, tmp_path):
    done = run_in_process(
        "circuit.py",
        *("--model", toy, "--weight", "1,5,17", "--stream", "on", "--out", tmp_path / "o"),
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "--stream on: this command needs the whole model (locate, controls, restore" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("all_linear", [False, True])
def test_quantize_streams_each_tensor_quantized_as_it_is_read(toy, all_linear):
    options = QuantizeOptions(bits=[4], blocks=[64], all_linear=all_linear)
    streamed, in_memory = streamed_and_in_memory(toy, quantize_study, options)
    assert streamed.baseline.nll == pytest.approx(in_memory.baseline.nll, rel=1e-6)
    for a, b in zip(streamed.quantized, in_memory.quantized, strict=True):
        assert (a.description, a.n_parameters) == (b.description, b.n_parameters)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6), a.description
    assert streamed.quantized[0].n_parameters == (7 * 3 if all_linear else 3)  # toy: 3 layers


def test_restore_streams_the_super_activation_put_back(toy):
    options = RestoreOptions(fraction=0.5)
    streamed, in_memory = streamed_and_in_memory(toy, restore_study, options)
    assert streamed.super_activations == in_memory.super_activations  # the same scan
    for kind in ("baseline", "zeroed", "restored"):
        a, b = getattr(streamed, kind), getattr(in_memory, kind)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6), kind
    assert streamed.restored.n_restored == in_memory.restored.n_restored > 0
    assert streamed.recovered == pytest.approx(in_memory.recovered, rel=1e-5)
