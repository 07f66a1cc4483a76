"""Perplexity must equal exp(mean NLL) computed by hand with the plain HF model."""

import math

import pytest
import torch
from conftest import ONE, build, byte_tokenizer

from sw_lens.errors import SwLensError
from sw_lens.perplexity import Protocol, evaluate, extended, rest_of, shared_tokens, windows

TEXT = "The quick brown fox jumps over the lazy dog. A super weight hides here. " * 6
BOS = byte_tokenizer().bos_token_id


def corpus_ids() -> torch.Tensor:
    return torch.tensor(byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"])


def hand_nll(hf_model, tokens, context, stride, bos):
    """Independent reference: one HF forward per window, scoring each corpus token once,
    written the way the HF perplexity guide describes it."""
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        chunk = tokens[begin:end].tolist()
        ids = ([BOS] if bos else []) + chunk
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
        for p in range(begin, end):
            i = p - begin + (1 if bos else 0)  # index of corpus token p in ids
            if p < scored_until or i == 0:
                continue
            total -= float(logp[i - 1, ids[i]])
            count += 1
        scored_until = end
        if end == len(tokens):
            break
    return total / count, count


@pytest.mark.parametrize(
    "window, stride, bos",
    [(64, None, False), (64, None, True), (64, 16, False), (48, 20, True), (128, None, True)],
)
def test_perplexity_equals_hand_computation(tiny, arch, window, stride, bos):
    tokens = corpus_ids()
    protocol = Protocol(window=window, stride=stride, prepend_bos=bos, batch_size=3)
    result = evaluate(tiny.bridge, tokens, protocol, corpus="test")
    reference = build(arch, [ONE])
    nll, count = hand_nll(reference, tokens, protocol.context, stride or protocol.context, bos)
    assert result.n_tokens == count
    assert result.nll == pytest.approx(nll, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert sorted(result.positions.tolist()) == sorted(set(result.positions.tolist()))


def test_scored_token_counts_follow_the_protocol():
    tokens = torch.arange(100)
    no_bos = windows(tokens, Protocol(window=30), bos_token_id=BOS)
    assert [len(w.input_ids) for w in no_bos] == [30, 30, 30, 10]
    assert sum(len(w.positions) for w in no_bos) == 100 - 4  # each window's first token
    with_bos = windows(tokens, Protocol(window=31, prepend_bos=True), bos_token_id=BOS)
    assert sum(len(w.positions) for w in with_bos) == 100
    assert all(int(w.input_ids[0]) == BOS for w in with_bos)
    sliding = windows(tokens, Protocol(window=30, stride=10), bos_token_id=BOS)
    assert torch.equal(torch.cat([w.positions for w in sliding]), torch.arange(1, 100))
    limited = windows(tokens, Protocol(window=30, max_tokens=45), bos_token_id=BOS)
    assert int(torch.cat([w.positions for w in limited]).max()) == 44


def test_targets_are_the_next_tokens():
    tokens = torch.arange(10, 20)
    (w,) = windows(tokens, Protocol(window=11, prepend_bos=True), bos_token_id=BOS)
    assert w.input_ids.tolist() == [BOS, *range(10, 20)]
    assert w.targets.tolist() == [*range(10, 20), -100]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=1), "window must be at least 2"),
        (dict(window=2, prepend_bos=True), "window must be at least 3"),
        (dict(window=10, stride=11), "stride must be between 1 and 10"),
        (dict(window=10, stride=0), "stride must be between"),
        (dict(max_tokens=0), "max_tokens must be positive"),
        (dict(max_tokens=-5), "max_tokens must be positive"),
        (dict(batch_size=0), "batch_size must be positive"),
    ],
)
def test_bad_protocols_are_refused(kwargs, message):
    with pytest.raises(SwLensError, match=message):
        Protocol(**kwargs)


def test_a_window_longer_than_the_context_is_refused(tiny):
    with pytest.raises(SwLensError, match="window 129 exceeds the model's context of 128"):
        evaluate(tiny.bridge, corpus_ids(), Protocol(window=129), corpus="test")


def test_a_corpus_shorter_than_one_window_is_refused():
    with pytest.raises(SwLensError, match="has 5 tokens, fewer than one window of 8"):
        windows(torch.arange(5), Protocol(window=8), bos_token_id=BOS)
    with pytest.raises(SwLensError, match="a budget of 1 tokens scores no token"):
        windows(torch.arange(50), Protocol(window=8, max_tokens=1), bos_token_id=BOS)


def test_protocol_is_described_and_saved_with_the_number(tiny):
    protocol = Protocol(window=32, stride=8, prepend_bos=True, max_tokens=100)
    saved = evaluate(tiny.bridge, corpus_ids(), protocol, corpus="test").to_dict()
    assert saved["protocol"] == {
        "window": 32,
        "stride": 8,
        "prepend_bos": True,
        "max_tokens": 100,
        "batch_size": 4,
    }
    assert saved["n_tokens"] == 100
    assert saved["protocol_description"] == (
        "token-level, window 32 (stride 8), BOS prepended, first 100 tokens"
    )


@pytest.mark.parametrize("bos", [False, True])
def test_a_longer_budget_reuses_the_windows_of_a_shorter_one(tiny, bos):
    tokens = corpus_ids()
    short = Protocol(window=32, prepend_bos=bos, max_tokens=2 * (32 - bos))
    long = Protocol(window=32, prepend_bos=bos, max_tokens=5 * (32 - bos))
    shared = shared_tokens(tokens, short, long)
    assert shared == short.max_tokens
    first = evaluate(tiny.bridge, tokens, short, "t")
    rest = evaluate(tiny.bridge, tokens[shared:], rest_of(long, shared), "t")
    joined, direct = extended(first, rest, shared, long), evaluate(tiny.bridge, tokens, long, "t")
    assert torch.equal(joined.positions, direct.positions) and joined.n_tokens == direct.n_tokens
    assert joined.nll == pytest.approx(direct.nll, rel=1e-6)
    for other in (
        Protocol(window=32, stride=16, max_tokens=64),
        Protocol(window=16, max_tokens=32),
    ):
        assert shared_tokens(tokens, other, long) == 0
    assert shared_tokens(tokens, Protocol(window=32, prepend_bos=bos, max_tokens=40), long) == 0
