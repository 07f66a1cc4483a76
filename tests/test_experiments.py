"""The paper's experiments as commands, run as a user runs them, on the toy model."""

import json

import pytest
from conftest import ONE, TOY, build, run_experiment, save

from sw_lens.results import read_json

SMALL = ["--window", "32", "--max-tokens", "512", "--batch-size", "8", "--device", "cpu"]
TOY_WEIGHT = f"{TOY.layer},{TOY.row},{TOY.col}"
FIGURE_STEMS = {
    "controls.py": "controls",
    "restore.py": "restore",
    "stopwords.py": "stopwords",
    "scaling.py": "scaling",
    "quantize.py": "quantize",
}
EXTRA = {
    "controls.py": ["--n-largest", "50", "--draws", "3"],
    "restore.py": ["--prompt", "the cat sat on the mat.", "--fraction", "0.5"],
    "stopwords.py": ["--n-prompts", "20"],
    "scaling.py": ["--factors", "0,0.5,2", "--task-prompts", "10"],
    "quantize.py": ["--bits", "4", "--blocks", "tensor", "128"],
}


def run_on_toy(toy, script, out, *args):
    base = ["--model", toy, "--text", toy / "corpus.txt", "--out", out, *SMALL]
    return run_experiment(script, *base, *args)


@pytest.mark.parametrize("script", list(FIGURE_STEMS))
def test_each_experiment_writes_its_results_and_figure(toy, tmp_path, script):
    out = tmp_path / "out"
    done = run_on_toy(toy, script, out, "--weight", TOY_WEIGHT, *EXTRA[script])
    assert done.returncode == 0, done.stderr
    stem = FIGURE_STEMS[script]
    doc = json.loads((out / f"{stem}.json").read_text())
    assert doc["schema_version"] == 2 and doc["kind"] == stem
    typed = read_json(out / f"{stem}.json", stem)  # valid against its schema
    assert json.loads(typed.to_json()) == doc
    (sw,) = doc["super_weights"]
    assert (sw["layer"], sw["row"], sw["col"], sw["value"]) == (1, 5, 17, TOY.value)
    assert doc["super_weight_source"] == "given (--weight)"
    assert (out / f"{stem}.png").is_file() and (out / f"{stem}.pdf").is_file()
    if "baseline" in doc:
        assert doc["baseline"]["protocol"]["window"] == 32
        assert "tokens scored" in done.stdout


def test_experiment_numbers_reach_the_results(toy, tmp_path):
    out = tmp_path / "out"
    done = run_on_toy(toy, "scaling.py", out, "--weight", TOY_WEIGHT, "--factors", "0,1,2")
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "scaling.json").read_text())
    points = {p["scale"]: p["perplexity"] for p in doc["scaling"]}
    assert doc["task"]["n_prompts"] > 0
    n = doc["task"]["n_prompts"]
    assert all(p["accuracy"]["n_prompts"] == n for p in doc["scaling"])
    assert all(p["accuracy"]["share"] == p["accuracy"]["correct"] / n for p in doc["scaling"])
    assert points[1.0] == doc["baseline"]["perplexity"]  # factor 1 is the baseline
    assert points[0.0] > 2 * points[1.0]
    redrawn = tmp_path / "redrawn"
    done = run_experiment("figures.py", out / "scaling.json", "--out", redrawn)
    assert done.returncode == 0, done.stderr
    assert (redrawn / "scaling.png").read_bytes() == (out / "scaling.png").read_bytes()
    done = run_on_toy(
        toy, "quantize.py", out, "--weight", TOY_WEIGHT, "--bits", "3", "--blocks", "tensor"
    )
    doc = json.loads((out / "quantize.json").read_text())
    ppl = {r["method"]: r["perplexity"] for r in doc["quantized"]}
    assert ppl["clipped + super weight"] < ppl["plain"]


def test_super_weights_come_from_the_rule_or_a_results_file(tmp_path):
    model = save(build("llama", [ONE]), tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some words with the trigger A in them, and A again. " * 12)
    common = ["--model", model, "--text", corpus, "--prompt", "xyz A qrs", *SMALL]
    out = tmp_path / "found"
    done = run_experiment(
        "scaling.py", *common, "--min-ppl-ratio", "0", "--find", "rule", "--out", out
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "scaling.json").read_text())
    assert [(w["layer"], w["row"], w["col"]) for w in doc["super_weights"]] == [(1, 5, 17)]
    assert doc["super_weight_source"].startswith("found by the spike rule")

    located = tmp_path / "located"
    done = run_experiment(
        "locate.py", *common, "--min-ppl-ratio", "0", "--find", "rule", "--out", located
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "from-results"
    results = located / "results.json"
    done = run_experiment("restore.py", *common, "--results", results, "--out", out)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "restore.json").read_text())
    assert doc["super_weight_source"] == f"super weights of {results}"


def test_bad_experiment_input_is_one_line(toy, tmp_path):
    out = tmp_path / "out"
    cases = [
        ("controls.py", ["--find", "rule"], "name one with --weight"),  # the rule finds none
        ("quantize.py", ["--weight", TOY_WEIGHT, "--bits", "1"], "bits must be between 2 and 16"),
        ("restore.py", ["--weight", TOY_WEIGHT, "--fraction", "2"], "fraction must be in (0, 1]"),
        ("scaling.py", ["--weight", "1,99,17"], "row out of range, d_model is 32"),
    ]
    for script, args, message in cases:
        done = run_on_toy(toy, script, out, *args)
        assert done.returncode == 2, (script, done.stderr)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], done.stderr
        assert "Traceback" not in done.stderr and not out.exists()
