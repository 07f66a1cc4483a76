"""Corpora: the embedded Lee corpus, local files, and clear errors for unusable text."""

import importlib.util

import pytest
from conftest import byte_tokenizer

from sw_lens.corpora import load_corpus, tokenize
from sw_lens.errors import SwLensError


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
def test_the_embedded_corpus_is_read_from_the_installed_gensim():
    corpus = load_corpus("lee")
    assert corpus.name == "lee" and "lee_background.cor" in corpus.description
    assert len(corpus.text) > 300_000
    assert corpus.text.startswith("Hundreds of people have been forced to vacate their homes")


def test_a_local_file_is_read_as_utf8(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Grüße aus Zürich.\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert (corpus.name, corpus.text) == (str(path), "Grüße aus Zürich.\n")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\t\n", "is empty"),
        (b"caf\xe9 latin-1", "is not UTF-8 \\(byte 3\\)"),
    ],
)
def test_unusable_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(SwLensError, match=message):
        load_corpus(str(path))


def test_a_missing_file_lists_the_named_corpora(tmp_path):
    with pytest.raises(
        SwLensError, match="neither a file nor a named corpus \\(lee, wikitext-2\\)"
    ):
        load_corpus(str(tmp_path / "missing.txt"))


def test_tokenize_adds_no_special_tokens():
    tok = byte_tokenizer()
    ids = tokenize(tok, "ab")
    assert ids.tolist() == tok("ab", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids.tolist()


def test_wikitext2_is_joined_as_the_hf_perplexity_guide_does(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": [" = Title = \n", "", " Body text .\n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("wikitext-2")
    assert corpus.text == " = Title = \n\n\n\n\n Body text .\n"
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_wikitext2_without_hub_or_cache_is_a_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SwLensError, match="WikiText-2 is not available") as err:
        load_corpus("wikitext-2")
    assert "\n" not in str(err.value) and "use --text lee or a local file" in str(err.value)


class CountingTokenizer:
    """A tokenizer that records how many characters it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.characters = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.characters += len(text)
        return self.tokenizer(text, **kwargs)


def test_a_budget_tokenizes_a_prefix_of_a_huge_one_line_corpus():
    words = ["alpha", "beta", "gamma", "delta", "A"]
    text = " ".join(words[i % 5] + str(i % 97) for i in range(3_000_000))  # ~30 MB, one line
    counting = CountingTokenizer(byte_tokenizer())
    tokens = tokenize(counting, text, limit=1024)
    assert counting.characters < 100_000  # not 30 million
    head = byte_tokenizer()(text[:20_000], add_special_tokens=False)["input_ids"]
    assert len(tokens) >= 1024 and tokens.tolist() == head[: len(tokens)]


def test_a_budget_gives_the_same_tokens_as_the_whole_text_with_a_real_bpe():
    pytest.importorskip("gguf")
    pytest.importorskip("gensim")
    from transformers import AutoTokenizer

    from sw_lens.models import _embedded_snapshot

    tokenizer = AutoTokenizer.from_pretrained(_embedded_snapshot("smollm2-135m"))
    text = load_corpus("lee").text
    whole = tokenize(tokenizer, text)
    for limit in (1, 300, 5000, len(whole) + 10):
        first = tokenize(tokenizer, text, limit=limit)
        assert len(first) >= min(limit, len(whole))
        assert first.tolist() == whole[: len(first)].tolist()
