"""The registry of published coordinates: the packaged entries are those of the paper and
the project, a registry file is checked, and the check reports match / mismatch / not in
registry."""

import json
import re

import pytest
from conftest import ONE, build, run_experiment, save

from sw_lens.errors import SwLensError
from sw_lens.locate import Candidate
from sw_lens.registry import KnownModel, KnownWeight, check_fits, check_known, load_registry, lookup
from sw_lens.vocabulary import (
    WeightCoord,
    describe,
)

PLANTED = WeightCoord(ONE.layer, ONE.row, ONE.col)


def test_the_packaged_registry_holds_the_papers_table_and_the_projects_claims():
    models = load_registry()
    coords = {(m.name, w.coord.layer, w.coord.row, w.coord.col) for m in models for w in m.weights}
    assert ("Llama-7B", 2, 3968, 7003) in coords
    assert ("Mistral-7B-v0.1", 1, 2070, 7310) in coords
    assert {("OLMo-1B-0724", 1, 1764, 1710), ("OLMo-1B-0724", 2, 1764, 8041)} <= coords
    phi = lookup(models, "microsoft/Phi-3-mini-4k-instruct")
    assert sorted((w.coord.layer, w.coord.row) for w in phi.weights) == [
        (2, 525), (2, 1113), (2, 1693), (4, 525), (4, 1113), (4, 1693),
    ]  # fmt: skip
    assert len(coords) == 23
    assert all(w.source for m in models for w in m.weights)
    (gpt2,) = lookup(models, "openai-community/gpt2").weights
    # nanoGPT's [out, in] "row 447, col 666" is TransformerLens W_out[2][666, 447].
    assert describe(gpt2.coord, "tl_w_out") == "blocks[2].mlp.W_out[666, 447]"
    assert describe(gpt2.coord, "gpt2_conv1d") == "transformer.h.2.mlp.c_proj.weight[666, 447]"
    assert gpt2.value == pytest.approx(15.069)
    (qwen,) = lookup(models, "/models/Qwen2.5-3B/").weights  # a local copy, by folder name
    assert (qwen.coord.layer, qwen.coord.row, qwen.coord.col, qwen.value) == (2, 318, 3189, -0.5508)
    assert lookup(models, "Qwen/Qwen2.5-3B-Instruct") is None  # another model


def test_a_registry_coordinate_outside_the_model_is_one_line(tiny):
    known = KnownModel("big", ("big",), (KnownWeight(WeightCoord(2, 3968, 7003), "x", "p", None),))
    with pytest.raises(SwLensError, match=r"registry entry for big \(p\): .*row out of range"):
        check_fits(tiny.bridge, known)


SOURCE = '[sources.s]\ncite = "a test"\n'
ENTRY = (
    '[[models]]\nname = "m"\nids = ["m"]\nweights = [{ layer = 1, row = 2, col = 3, source = "s"'
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            SOURCE + ENTRY.replace(", col = 3", "") + " }]\n",
            "lacks the field 'models[0].weights[0].col'",
        ),
        ("[[models]\n", "is not valid TOML"),
        ("models = 5\n" + SOURCE, "models: Input should be a valid list"),
        (
            SOURCE + ENTRY + ", value = nan }]\n",
            "weights[0].value: Input should be a finite number",
        ),
        (
            SOURCE + ENTRY.replace("layer = 1", 'layer = "1"') + " }]\n",
            "layer: Input should be a valid int",
        ),
        (SOURCE + ENTRY.replace("row = 2", "row = -2") + " }]\n", "greater than or equal to 0"),
        (SOURCE + ENTRY.replace('source = "s"', 'source = "x"') + " }]\n", "source 'x' is not in"),
        ("sources = 3\n", "sources: Input should be a valid dictionary"),
    ],
)
def test_a_malformed_registry_names_the_entry(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SwLensError, match=re.escape(message)):
        load_registry(path)


def candidate(coord, is_super, effect=2.0):
    """A found weight with the fields `check_known` reads (no spikes needed)."""
    return Candidate(coord, 1.0, "p", (0, 0), 1, None, None, None, "creates", 1.0, effect, is_super)


def test_check_known_statuses(tiny):
    other = WeightCoord(3, 2, 11)
    known = KnownModel(
        "tiny",
        ("tiny",),
        (
            KnownWeight(PLANTED, "src", "pub", ONE.value),
            KnownWeight(other, "src", "pub", 1.0),
        ),
    )
    found = [candidate(PLANTED, True), candidate(WeightCoord(3, 4, 5), True)]
    checks = check_known(tiny.bridge, known, found)
    assert [c.status for c in checks] == ["match", "mismatch", "not in registry"]
    assert checks[0].value_agrees is True and checks[0].model_value == ONE.value
    assert checks[1].value_agrees is False and "(DIFFERS)" in checks[1].message
    assert "found in its layer: layer 3 down_proj.weight[4, 5]" in checks[1].message
    assert "W_out[5, 4]" in checks[2].message
    found = [candidate(PLANTED, False, effect=1.01)]
    assert check_known(tiny.bridge, known, found)[0].status == "named, not super"
    (none,) = check_known(tiny.bridge, None, [])
    assert none.status == "not in registry"


SMALL = ["--window", "64", "--max-tokens", "128", "--rank-tokens", "64", "--device", "cpu"]


def test_locate_check_known_against_a_registry_file(tmp_path):
    model = save(build("llama", [ONE]), tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some words with the trigger A in them, and A again. " * 12)
    registry = tmp_path / "registry.toml"
    registry.write_text(
        '[sources.mine]\ncite = "a test"\n[[models]]\nname = "Tiny"\nids = ["org/tiny-llama"]\n'
        f"weights = [{{ layer = {ONE.layer}, row = {ONE.row}, col = {ONE.col}, "
        f'value = {ONE.value}, source = "mine", published = "planted" }},\n'
        '  { layer = 4, row = 1, col = 2, source = "mine" }]\n'
    )
    out = tmp_path / "out"
    args = ["--model", model, "--text", corpus, "--prompt", "xyz A qrs", "--out", out, *SMALL]
    args += [
        "--min-ppl-ratio",
        "0",
        "--find",
        "rule",
    ]  # a random tiny model does not depend on its planted weight
    done = run_experiment("locate.py", *args, "--check-known", "--registry", registry)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["known"]["entry"] == "Tiny"
    assert [c["status"] for c in doc["known"]["checks"]] == ["match", "mismatch"]
    assert doc["known"]["checks"][0]["value_agrees"] is True
    labels = [a["label"] for a in doc["perplexity"]["ablations"]]
    assert "layer 4 down_proj.weight[1, 2] (published)" in labels  # measured too
    assert "match: registry layer 1 down_proj.weight[5, 17] [planted; a test]" in done.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(registry.read_text().replace("row = 1,", "row = 999,"))
    done = run_experiment("locate.py", *args, "--check-known", "--registry", bad)
    assert done.returncode == 2 and "row out of range, d_model is 32" in done.stderr
    assert "Traceback" not in done.stderr
