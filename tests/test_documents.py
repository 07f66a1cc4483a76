"""Results files are untrusted: each kind is checked against its schema before anything
reads it, and a bad one is one line, exit 2, and nothing written, through the commands."""

import json
import math

import pytest
from conftest import run_experiment, run_in_process

from sw_lens.documents import KINDS, Locate, Scaling, Track, validate
from sw_lens.errors import SwLensError
from sw_lens.results import read_json


def setter(path: str, value):
    """A change that sets document[a][b]... (integers index lists) to `value`."""

    def change(document):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = document
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def truncate(path: str, keep: int):
    def change(document):
        target = document
        for key in [int(k) if k.isdigit() else k for k in path.split(".")]:
            target = target[key]
        del target[keep:]

    return change


HOSTILE_LOCATE = [
    (setter("schema_version", 3), "has schema_version 3; this sw_lens reads 2"),
    (setter("kind", "nonsense"), "holds 'nonsense'"),
    (setter("scan.layers.0.post.value", "big"), "scan.layers[0].post.value: Input should be a"),
    (setter("perplexity.baseline.perplexity", math.nan), "Input should be a finite number"),
    (setter("token_loss.delta.3", math.inf), "token_loss.delta[3]: Input should be a finite"),
    (setter("candidates.0.layer", 99), "a weight (layer 99, row 5, col 17) lies outside"),
    (setter("super_weights.0.row", -1), "greater than or equal to 0"),
    (truncate("scan.layers", 2), "scan.layers must list layers 0..5 in order"),
    (truncate("token_loss.delta", 5), "delta and tokens differ in length"),
    (truncate("predictions.after", 1), "before and after differ in length"),
    (setter("layer_activations.0.post.0", [1.0]), "post is not tokens x post_channels"),
    (setter("weight_distributions.0.edges", []), "edges must be one longer than counts"),
    (setter("model.n_layers", True), "model.n_layers: Input should be a valid integer"),
    (setter("token_loss.tokens.0", 7), "token_loss.tokens[0]: Input should be a valid string"),
    (setter("perplexity.ablations.0.weights", [{"layer": 0, "row": 0}]), "lacks the field"),
    # Valid types, but nothing a figure can lay out: still one line, and quickly.
    (setter("perplexity.baseline.perplexity", 1e308), "cannot draw perplexity_bars"),
    (
        lambda d: d["perplexity"]["ablations"].extend(d["perplexity"]["ablations"] * 5000),
        "perplexity.ablations: List should have at most 200 items",
    ),
]


@pytest.mark.parametrize(("change", "message"), HOSTILE_LOCATE)
def test_a_hostile_results_file_is_one_line_and_draws_nothing(
    results_file, tmp_path, change, message
):
    document = json.loads(results_file.read_text())
    change(document)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(document))  # NaN and Infinity as Python writes them
    done = run_in_process("figures.py", bad)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "has schema_version None"),
        ("{", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        (b"\xff\xfe".decode("latin-1"), "is not valid JSON"),
    ],
)
def test_a_file_that_is_no_document_is_one_line(tmp_path, text, message):
    bad = tmp_path / "results.json"
    bad.write_text(text, encoding="latin-1")
    done = run_in_process("figures.py", bad)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line


def test_a_hostile_results_file_is_refused_by_an_experiment_before_any_work(results_file, tmp_path):
    document = json.loads(results_file.read_text())
    document["super_weights"][0]["col"] = 10**9
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(document))
    out = tmp_path / "out"
    model = document["model"]["location"]
    corpus = results_file.parent / "corpus.txt"
    done = run_experiment(
        *("controls.py", "--model", model, "--text", corpus, "--window", "64"),
        *("--results", bad, "--out", out, "--device", "cpu"),
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "lies outside the model" in line and not out.exists()


def other_kinds():
    """A valid document of each experiment kind, small but complete."""
    model = {"name": "m", "architecture": "A", "n_layers": 4, "d_model": 8, "d_mlp": 16}
    ppl = {"corpus": "c", "protocol_description": "p", "n_tokens": 10, "nll": 1.0}
    ppl |= {"perplexity": math.e}
    provenance = {"created": "", "git_commit": None, "versions": {}, "device": "cpu"}
    provenance |= {"dtype": "float32", "seed": 0}
    head = {"schema_version": 2, "provenance": provenance, "model": model}
    experiment = head | {
        "super_weights": [{"layer": 1, "row": 2, "col": 3, "value": 5.0}],
        "super_weight_source": "given",
        "baseline": ppl,
    }
    rows = [
        ppl
        | {"bits": b, "block": k, "method": m, "description": "q", "n_parameters": 4, "ratio": 1.1}
        for b in (4, 3)
        for k in ("tensor", 128)
        for m in ("plain", "clipped")
    ]
    control = {"label": "(a)", "kind": "super", "n_weights": 1, "perplexity": 9.0, "ratio": 3.3}
    draws = {"draws": 2, "mean": 3.0, "std": 0.1, "min": 2.9, "max": 3.1}
    spike = {"layer": 1, "magnitude": 9.0, "post_channel": 3, "mlp_out_channel": 2, "token": "a"}
    checkpoint = {"path": "c.pt", "iter_num": 0, "spike": spike, "perplexity": None}
    checkpoint |= {"max_post": [1.0] * 4, "max_mlp_out": [1.0] * 4, "candidates": []}
    criterion = {"min_ppl_ratio": 1.1, "description": "d"}
    scaled = [
        ppl | {"scale": s, "accuracy": {"correct": 3, "n_prompts": 4, "share": 0.75}}
        for s in (0.0, 1.0)
    ]
    return {
        "quantize": experiment | {"kind": "quantize", "quantized": rows},
        "controls": experiment
        | {
            "kind": "controls",
            "controls": [control],
            "summary": draws | {"largest_share": 0.0, "largest_min_abs": None},
        },
        "scaling": experiment
        | {
            "kind": "scaling",
            "scaling": scaled,
            "task": {"description": "t", "source": "s", "n_prompts": 4},
        },
        "track": head
        | {"kind": "track", "criterion": criterion, "prompts": ["p"], "checkpoints": [checkpoint]},
    }


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("quantize", lambda d: d["quantized"].pop(), "the grid is incomplete"),
        ("quantize", setter("quantized.0.bits", 1), "greater than or equal to 2"),
        ("controls", setter("controls.0.kind", "evil"), "Input should be 'super'"),
        ("controls", setter("summary.mean", None), "draws without mean/min/max"),
        ("controls", setter("super_weights.0.layer", 4), "lies outside the model"),
        ("track", setter("checkpoints.0.spike.layer", 4), "a spike in layer 4 of 4"),
        ("track", setter("checkpoints.0.iter_num", 1.5), "Input should be a valid integer"),
        ("track", truncate("checkpoints.0.max_post", 3), "a checkpoint without 4 layers"),
        ("scaling", setter("scaling.0.accuracy.correct", 5), "more correct than prompts"),
        ("scaling", setter("scaling.1.accuracy.share", 0.5), "share != correct / n"),
        ("scaling", setter("task.n_prompts", 5), "a point lacks accuracy on the task's prompts"),
    ],
)
def test_every_kind_has_its_invariants(kind, change, message):
    document = other_kinds()[kind]
    validate(document, KINDS[kind].schema, "doc")  # the valid one passes
    change(document)
    with pytest.raises(SwLensError, match=message):
        validate(document, KINDS[kind].schema, "doc")


def test_the_schema_accepts_what_locate_writes(results_file):
    validate(json.loads(results_file.read_text()), Locate, "results")


def test_dollar_signs_in_a_document_are_drawn_as_text(results_file, tmp_path):
    """Matplotlib reads "$...$" as mathtext; a token such as "$\\frac{" must neither fail
    to parse nor change how the figure is drawn."""
    document = json.loads(results_file.read_text())
    layer = document["super_weights"][0]["layer"]
    document["scan"]["layers"][layer]["mlp_out"]["token"] = "$\\frac{"
    document["model"]["name"] = "price $5 or $6"
    document["layer_activations"][0]["tokens"][0] = "$^$"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    done = run_in_process("figures.py", path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "spike_heatmap.png").is_file()


def test_every_kind_names_a_figure_that_exists_and_the_sweep_runs_the_swept_ones():
    from sw_lens import figures
    from sw_lens.sweep import EXPERIMENTS

    for entry in KINDS.values():
        assert callable(getattr(figures, entry.figure))
    assert EXPERIMENTS == (
        "locate",
        "controls",
        "restore",
        "stopwords",
        "scaling",
        "quantize",
        "circuit",
    )


@pytest.mark.parametrize("kind", ["quantize", "controls", "scaling", "track"])
def test_every_kind_round_trips_through_its_type(kind):
    schema = KINDS[kind].schema
    document = schema.from_json(json.dumps(other_kinds()[kind]))
    assert type(document) is schema
    assert schema.from_json(document.to_json()) == document
    assert json.loads(document.to_json()) == json.loads(json.dumps(other_kinds()[kind]))


def test_the_locate_document_round_trips_and_reads_as_attributes(results_file):
    document = read_json(results_file, "locate")
    assert Locate.from_json(document.to_json()) == document
    assert json.loads(document.to_json()) == json.loads(results_file.read_text())
    assert document.super_weights[0].output_activation.value == pytest.approx(
        json.loads(results_file.read_text())["super_weights"][0]["output_activation"]["value"]
    )


def test_a_schema_1_document_is_upgraded_or_refused_naming_the_version(results_file, tmp_path):
    old = json.loads(results_file.read_text()) | {"schema_version": 1}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert read_json(path, "locate").model_dump() == read_json(results_file, "locate").model_dump()

    scaling = other_kinds()["scaling"] | {"schema_version": 1}
    for point in scaling["scaling"]:
        point["accuracy"] = 0.75  # schema 1: a bare share of the task's 4 prompts
    upgraded = Scaling.from_json(json.dumps(scaling))
    assert [p.accuracy.correct for p in upgraded.scaling] == [3, 3]
    assert upgraded.schema_version == 2

    track = other_kinds()["track"] | {"schema_version": 1}
    with pytest.raises(SwLensError, match="has schema_version 1, whose tracks name no model"):
        Track.from_json(json.dumps(track), "track.json")
