"""Token classes from the stopword list, and the per-class probability mass."""

import pytest
import torch
from conftest import ONE, byte_tokenizer

from sw_lens.errors import SwLensError
from sw_lens.patching import ablation_hooks
from sw_lens.predictions import accuracy, next_token_logits
from sw_lens.setup import prompt_tokens
from sw_lens.stopwords import CLASSES, class_mass, lambada, last_word_contexts, token_classes
from sw_lens.vocabulary import WeightCoord


def test_byte_tokens_are_classed_by_the_stopword_list():
    tokenizer = byte_tokenizer()
    classes = token_classes(tokenizer, len(tokenizer) + 3)  # a padded vocabulary
    name = {t: CLASSES[int(classes[tokenizer.convert_tokens_to_ids(t)])] for t in "aibx.7"}
    assert name == {
        "a": "stopword",
        "i": "stopword",
        "b": "word",
        "x": "word",
        ".": "other",
        "7": "other",
    }
    assert [CLASSES[int(c)] for c in classes[-3:]] == ["other"] * 3


def test_class_mass_is_the_softmax_summed_per_class(tiny):
    model = tiny.bridge
    classes = token_classes(tiny.tokenizer, model.cfg.d_vocab)
    contexts = prompt_tokens(tiny, ["xyz A qrs", "the cat sat on"], False)
    coords = [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    mass = class_mass(model, contexts, classes, coords)
    assert torch.allclose(mass.before.sum(1), torch.ones(2), atol=1e-5)
    for ids, before, after in zip(contexts, mass.before, mass.after, strict=True):
        for hooks, expected in (([], before), (ablation_hooks(model, coords), after)):
            probs = model.run_with_hooks(ids[None], fwd_hooks=hooks)[0, -1].softmax(-1)
            hand = torch.stack([probs[classes == i].sum() for i in range(len(CLASSES))])
            assert torch.allclose(hand, expected, atol=1e-5)
    summary = mass.summary()
    assert summary["word"]["ratio"] == pytest.approx(
        float(mass.after[:, 1].mean() / mass.before[:, 1].mean())
    )


def test_last_word_contexts_hold_out_the_final_word():
    assert last_word_contexts(["The cat sat on the mat.", "Done"]) == [
        ("The cat sat on the", "mat")
    ]


def test_lambada_offline_is_one_line():
    with pytest.raises(SwLensError, match="LAMBADA is not available"):
        lambada(5)


def test_next_word_accuracy_is_the_hand_counted_top_1(tiny):
    model = tiny.bridge
    contexts = prompt_tokens(tiny, ["xyz A qrs", "the cat sat on", "A"], False)
    coords = [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    for scale in (0.0, 1.0, 2.0):
        hooks = ablation_hooks(model, coords, scale)
        top = [
            int(model.run_with_hooks(ids[None], fwd_hooks=hooks)[0, -1].argmax())
            for ids in contexts
        ]
        targets = [top[0], top[1] + 1, top[2]]  # two hits, one miss
        counted = accuracy(next_token_logits(model, contexts, coords, scale), targets)
        assert (counted.correct, counted.n_prompts) == (2, 3)
        assert counted.share == pytest.approx(2 / 3)
