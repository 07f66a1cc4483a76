"""Robustness across texts: counts, activations and token kinds against hand computation."""

from statistics import median

import pytest
from conftest import ONE, Plant, build, run_experiment, save

from sw_lens.models import load_model
from sw_lens.results import read_json
from sw_lens.robustness import robustness, token_kind
from sw_lens.setup import prompt_tokens
from sw_lens.vocabulary import WeightCoord

DELIMITED = Plant(layer=1, row=5, col=17, dim=3, trigger=".")
TEXTS = ["xyz. qrs", "ab cd. ef", "no stop here", "one more. x", "plain words"]


@pytest.fixture
def delimited(tmp_path):
    return load_model(str(save(build("llama", [DELIMITED]), tmp_path / "dot")), device="cpu")


def report_for(loaded, texts, prepend_bos=False, **kwargs):
    ids = prompt_tokens(loaded, texts, prepend_bos)
    return ids, robustness(loaded.bridge, ids, prepend_bos, **kwargs)


def test_a_weight_firing_on_full_stops_is_delimiter_bound(delimited):
    _, report = report_for(delimited, TEXTS)
    (planted,) = [r for r in report if (r.layer, r.row, r.col) == (1, 5, 17)]
    assert planted.n_texts == 5
    assert planted.n_top == planted.n_rule == 3  # the three texts with a "."
    assert planted.kinds == {"BOS": 0, "first token": 0, "delimiter": 3, "other": 0}
    assert planted.flags == ["delimiter-bound"]
    fired = [f for f in planted.firings if f.is_top]
    assert [f.text for f in fired] == [0, 1, 3]
    assert all(f.token == "." for f in fired)


def test_activations_are_the_hand_computed_column_maxima(delimited):
    ids, report = report_for(delimited, TEXTS)
    (planted,) = [r for r in report if (r.layer, r.row, r.col) == (1, 5, 17)]
    hand, own = [], []
    w = float(delimited.bridge.blocks[1].mlp.W_out.detach()[17, 5])
    for text in ids:
        _, cache = delimited.bridge.run_with_cache(text[None])
        column = cache["blocks.1.mlp.out.hook_out"][0, :, 5]
        hand.append(float(column.abs().max()))
        own.append(float((cache["blocks.1.mlp.hook_post"][0, :, 17] * w).abs().max()))
        pos = int(column.abs().argmax())
        firing = planted.firings[len(hand) - 1]
        assert firing.pos == pos
        assert firing.post == pytest.approx(float(cache["blocks.1.mlp.hook_post"][0, pos, 17]))
    assert planted.median_activation == pytest.approx(median(hand), rel=1e-6)
    assert planted.max_activation == pytest.approx(max(hand), rel=1e-6)
    assert planted.max_activation > 50  # the planted spike, not noise
    assert planted.median_contribution == pytest.approx(median(own), rel=1e-6)
    assert planted.max_contribution == pytest.approx(max(own), rel=1e-6)
    assert planted.roles == {"creates": planted.n_rule, "cancels": 0}


def test_weights_of_one_row_share_its_activation_but_not_their_contribution(delimited):
    """Six weights of one output row read the same row maximum; what each contributes
    differs, and that is what the report ranks them by."""
    _, report = report_for(delimited, TEXTS, weights=[WeightCoord(1, 5, c) for c in (0, 1)])
    row = [r for r in report if (r.layer, r.row) == (1, 5)]
    assert len({r.max_activation for r in row}) == 1
    assert len({r.max_contribution for r in row}) == len(row) == 3


def test_a_weight_seen_in_one_text_is_flagged(tiny):
    texts = ["xyz A qrs", "lower case only", "more plain text", "nothing here"]
    _, report = report_for(tiny, texts)
    (planted,) = [r for r in report if (r.layer, r.row, r.col) == (ONE.layer, ONE.row, ONE.col)]
    assert (planted.n_top, planted.n_rule) == (1, 1)
    assert "found on one prompt only" in planted.flags
    assert planted.kinds["other"] == 1


def test_given_weights_are_reported_even_when_the_rule_never_names_them(tiny):
    quiet = WeightCoord(4, 2, 11)
    _, report = report_for(tiny, ["plain", "text"], weights=[quiet])
    (given,) = [r for r in report if (r.layer, r.row, r.col) == (4, 2, 11)]
    assert given.n_rule == 0 and "never named by the rule" in given.flags


def test_bos_and_first_token_kinds(tiny):
    ids, report = report_for(tiny, ["A first", "A again"], prepend_bos=True)
    assert int(ids[0][0]) == tiny.tokenizer.bos_token_id
    (planted,) = [r for r in report if (r.layer, r.row, r.col) == (ONE.layer, ONE.row, ONE.col)]
    assert planted.kinds["first token"] == 2 and "first-token-bound" in planted.flags


@pytest.mark.parametrize(
    ("text", "pos", "bos", "kind"),
    [
        ("<s>", 0, True, "BOS"),
        ("Hello", 1, True, "first token"),
        ("Hello", 0, False, "first token"),
        (".", 3, False, "delimiter"),
        ("\n", 3, True, "delimiter"),
        (" ,", 2, False, "delimiter"),
        (" the", 2, False, "other"),
        (" 4:00", 2, False, "other"),
    ],
)
def test_token_kind(text, pos, bos, kind):
    assert token_kind(text, pos, bos) == kind


def test_robustness_command(tmp_path):
    model = save(build("llama", [DELIMITED]), tmp_path / "dot")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One short sentence here. Another sentence comes next! A third one ends?")
    out = tmp_path / "out"
    done = run_experiment(
        "robustness.py", "--model", model, "--text", corpus, "--device", "cpu", "--out", out
    )
    assert done.returncode == 0, done.stderr
    doc = read_json(out / "robustness.json", "robustness")  # valid against its schema
    assert doc.kind == "robustness" and doc.n_texts == 4  # the paper's prompt + 3
    (planted,) = [w for w in doc.weights if w.key() == (1, 5, 17)]
    # Only the paper's prompt and the first sentence have a "." (the trigger).
    assert planted.n_rule == planted.n_top == 2
    assert planted.flags == ["delimiter-bound"]
    assert (out / "robustness.png").is_file() and (out / "robustness.pdf").is_file()
    assert "delimiter-bound" in done.stdout
