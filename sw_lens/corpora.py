"""Text sources for perplexity and scans, turned into one token stream.

A corpus is named by the user as ``lee`` (the embedded default: gensim's Lee
background corpus, ~75k tokens of news prose, read from the installed package),
``wikitext-2`` (WikiText-2 raw test split through ``datasets``, the field's reference
corpus; needs the hub or a datasets cache) or a path to a UTF-8 text file.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from sw_lens.errors import SwLensError
from sw_lens.packaged import package_file

DEFAULT_CORPUS = "lee"
NAMED = {
    "lee": "gensim/test/test_data/lee_background.cor (Lee background corpus, embedded)",
    "wikitext-2": "wikitext-2-raw-v1 test split via datasets (the hub or a datasets cache)",
}


@dataclass(frozen=True)
class Corpus:
    name: str  # "lee", "wikitext-2" or the file path
    description: str
    text: str


def load_corpus(source: str = DEFAULT_CORPUS) -> Corpus:
    """Read a named corpus or a UTF-8 file; empty or undecodable text is a one-line error."""
    if source == "lee":
        path = package_file("gensim", "test/test_data/lee_background.cor", "pip install gensim")
        text = path.read_text(encoding="utf-8")
    elif source == "wikitext-2":
        text = _wikitext2()
    else:
        text = read_text_file(Path(source))
    if not text.strip():
        raise SwLensError(f"corpus '{source}' is empty")
    return Corpus(source, NAMED.get(source, f"local file {source}"), text)


def sentences(text: str, n: int, min_words: int = 4) -> list[str]:
    """The first `n` sentences of `text` with at least `min_words` words: a split after
    ".", "!" or "?" followed by whitespace (an abbreviation such as "Dr." splits a
    sentence in two; short fragments are dropped by `min_words`)."""
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if len(sentence.split()) >= min_words:
            found.append(sentence)
        if len(found) == n:
            break
    if not found:
        raise SwLensError(f"the text has no sentence of {min_words} or more words")
    return found


def read_text_file(path: Path) -> str:
    if not path.is_file():
        named = ", ".join(NAMED)
        raise SwLensError(f"text '{path}' is neither a file nor a named corpus ({named})")
    data = path.read_bytes()
    if b"\x00" in data:
        raise SwLensError(f"text file '{path}' looks binary (it has NUL bytes): give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SwLensError(f"text file '{path}' is not UTF-8 (byte {err.start})") from None


def hub_dataset(path: str, name: str, split: str, what: str, instead: str):
    """A `datasets` split from the hub or the datasets cache, or a one-line error saying
    what to use `instead`."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # datasets raises many types for "no network / no cache"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SwLensError(
            f"{what} is not available (no hub access and no datasets cache): {reason}; "
            f"use {instead}"
        ) from None


def _wikitext2() -> str:
    rows = hub_dataset(
        "wikitext", "wikitext-2-raw-v1", "test", "WikiText-2", "--text lee or a local file"
    )
    # The join used by the HF perplexity guide and lm-eval's wikitext task.
    return "\n\n".join(rows["text"])


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    d_vocab: int | None = None,
    limit: int | None = None,
) -> Int[Tensor, "n_tokens"]:
    """Token ids of `text` with no special tokens: BOS is the perplexity protocol's choice,
    not the tokenizer's. With `d_vocab`, ids the model has no embedding for (a character
    outside a char-level vocabulary) are refused here rather than crashing a forward.

    With `limit`, at least the first `limit` tokens (all of them if the text has fewer),
    exactly as tokenizing the whole text gives them: a 30 MB corpus is not tokenized (and
    held) whole for a budget of a thousand tokens."""
    ids = _ids(tokenizer, text) if limit is None else _first_ids(tokenizer, text, limit)
    if not ids:
        raise SwLensError("the text produced no tokens")
    tokens = torch.tensor(ids, dtype=torch.long)
    if d_vocab is not None and int(tokens.max()) >= d_vocab:
        bad = tokenizer.decode([int(tokens[tokens >= d_vocab][0])])
        raise SwLensError(
            f"the text has tokens outside the model's vocabulary of {d_vocab} (e.g. {bad!r}); "
            f"use a text the tokenizer covers"
        )
    return tokens


# Tokens dropped before a cut: a cut at whitespace changes at most the last word's
# tokens; this many more is a wide margin for tokenizers that look further back.
_CUT_MARGIN = 64


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_ids(tokenizer: PreTrainedTokenizerBase, text: str, limit: int) -> list[int]:
    """Tokenize growing prefixes, each cut at whitespace, until one yields `limit` tokens
    beyond a margin before its cut; the whole text when no cut at whitespace exists."""
    chars = 8 * (limit + _CUT_MARGIN)  # most tokenizers give 2-5 characters per token
    while chars < len(text):
        cut = max(text.rfind("\n", 0, chars), text.rfind(" ", 0, chars))
        if cut <= 0:
            break
        ids = _ids(tokenizer, text[:cut])
        if len(ids) >= limit + _CUT_MARGIN:
            return ids[: len(ids) - _CUT_MARGIN]
        chars *= 2
    return _ids(tokenizer, text)
