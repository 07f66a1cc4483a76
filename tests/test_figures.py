"""Figures come from a results file alone, are the size a paper column needs, and draw."""

import html
import json
import re

import numpy as np
import pytest
from conftest import run_experiment
from matplotlib.image import imread

import sw_lens.models
from sw_lens.figures import COLUMN_WIDTH, DPI, render_all
from sw_lens.results import read_json

STEMS = [
    "down_proj_input_max",
    "down_proj_output_max",
    "spike_heatmap",
    "perplexity",
    "weight_outlier",
]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("figures must not load a model")

    monkeypatch.setattr(sw_lens.models, "load_model", refuse)
    monkeypatch.setattr(sw_lens.models, "_load_pretrained", refuse)
    monkeypatch.setattr(sw_lens.models.TransformerBridge, "boot_transformers", refuse)
    monkeypatch.setattr(sw_lens.models.AutoModelForCausalLM, "from_pretrained", refuse)


def test_every_figure_is_written_from_the_results_alone(results_file, tmp_path, no_model_loading):
    document = read_json(results_file, "locate")
    paths = render_all(document, tmp_path)
    expected = {f"{s}.{ext}" for s in STEMS for ext in ("pdf", "png")} | {"token_loss.html"}
    assert {p.name for p in paths} == expected
    for path in paths:
        assert path.stat().st_size > 1000
    for stem in STEMS:
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        pixels = imread(tmp_path / f"{stem}.png")
        assert pixels.shape[1] == round(COLUMN_WIDTH * DPI)  # one paper column at 300 dpi
        assert pixels.shape[0] >= 0.5 * DPI
        # Something was drawn: a good share of pixels is not background white.
        assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.02, stem


def reds(path):
    pixels = imread(path)[..., :3]
    red = np.array([0xD6, 0x27, 0x28]) / 255  # the marker and bar colour
    return int((np.abs(pixels - red).max(axis=-1) < 0.05).sum())


def test_marks_and_bars_are_drawn_in_their_colours(results_file, tmp_path):
    render_all(read_json(results_file, "locate"), tmp_path)
    assert reds(tmp_path / "down_proj_output_max.png") > 50  # the super-weight layer marker
    assert reds(tmp_path / "perplexity.png") > 1000  # the ablated bar
    assert reds(tmp_path / "weight_outlier.png") > 50  # the super weight's line


def test_the_token_loss_page_has_one_element_per_scored_token(results_file, tmp_path):
    document = read_json(results_file, "locate")
    (page,) = [p for p in render_all(document, tmp_path) if p.suffix == ".html"]
    text = page.read_text()
    loss = document.token_loss
    assert len(loss.tokens) == len(loss.delta) == 40
    props = re.search(r"CircuitsVis\.ColoredTokens,\s*(\{.*?\})\s*\)", text, re.S).group(1)
    props = json.loads(props)
    assert props["tokens"] == [html.escape(t) for t in loss.tokens]  # circuitsvis: HTML
    assert props["values"] == pytest.approx(loss.delta)
    embedded = re.search(r'id="sw-lens-token-loss">(.*?)</script>', text, re.S).group(1)
    assert json.loads(embedded)["delta"] == loss.delta
    assert "unpkg.com" not in text  # the JavaScript is inlined: it opens offline
    for before in document.predictions.before:
        assert f"{before.prob:.3f}" in text


def test_deltas_are_the_difference_of_the_saved_losses(results_file):
    loss = read_json(results_file, "locate").token_loss
    assert loss.delta == pytest.approx(
        [a - b for a, b in zip(loss.ablated_nll, loss.baseline_nll, strict=True)]
    )


def run_figures(*args):
    return run_experiment("figures.py", *args)


def test_the_command_regenerates_figures_next_to_the_results(results_file, tmp_path):
    copy = tmp_path / "results.json"
    copy.write_text(results_file.read_text())
    done = run_figures(copy)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "spike_heatmap.png").is_file() and (tmp_path / "token_loss.html").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema_version=0), "has schema_version 0; this sw_lens reads 2"),
        (lambda d: d.pop("layer_activations"), "lacks the field 'layer_activations'"),
        (lambda d: d["perplexity"].pop("baseline"), "lacks the field 'perplexity.baseline'"),
    ],
)
def test_old_or_incomplete_results_are_one_line_errors(results_file, tmp_path, change, message):
    document = json.loads(results_file.read_text())
    change(document)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(document))
    done = run_figures(bad)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: results file") and message in line
    assert not (tmp_path / "perplexity.png").exists()
