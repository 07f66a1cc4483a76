"""Does removing a super weight push probability towards stopwords? (paper, Sec. 3.2, Fig. 4)

The paper finds that without the super weight, Llama-7B puts more next-token probability
on stopwords ("the", "a", ".") and less on content words. Here every token of the
vocabulary is put in one class by its decoded text: a *stopword* (the stripped,
lower-cased text is in gensim's English stopword list, `STOPWORD_SOURCE`), a *word*
(alphabetic, not a stopword; subword pieces count), or *other* (punctuation, digits,
whitespace, special tokens). For each prompt we take the next-token distribution after
it and sum it per class, before and after the ablation.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from sw_lens.corpora import hub_dataset
from sw_lens.errors import SwLensError
from sw_lens.locate import RuleModel, rule_model
from sw_lens.vocabulary import WeightCoord

CLASSES = ("stopword", "word", "other")
STOPWORD_SOURCE = "gensim.parsing.preprocessing.STOPWORDS (English, 337 words)"


def stopword_list() -> frozenset[str]:
    from gensim.parsing.preprocessing import STOPWORDS  # slow to import; only needed here

    return frozenset(STOPWORDS)


def token_classes(tokenizer: PreTrainedTokenizerBase, d_vocab: int) -> Int[Tensor, "d_vocab"]:
    """Index into `CLASSES` for every token id of the model (ids past the tokenizer's
    vocabulary, e.g. padding, are "other")."""
    stopwords = stopword_list()
    n = min(len(tokenizer), d_vocab)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    classes = torch.full((d_vocab,), CLASSES.index("other"), dtype=torch.long)
    for i, text in enumerate(texts):
        word = text.strip().lower()
        if word in stopwords:
            classes[i] = CLASSES.index("stopword")
        elif word.isalpha():
            classes[i] = CLASSES.index("word")
    return classes


def last_word_contexts(sentences: Sequence[str]) -> list[tuple[str, str]]:
    """(context, target) with the last word of each sentence held out, as LAMBADA does;
    final punctuation is dropped with the word."""
    pairs = []
    for sentence in sentences:
        context, _, last = sentence.rstrip(".!?\"' ").rpartition(" ")
        if context.strip() and last:
            pairs.append((context, last))
    if not pairs:
        raise SwLensError("no sentence of two or more words to hold the last word out of")
    return pairs


def lambada(n: int) -> list[tuple[str, str]]:
    """The first `n` LAMBADA test passages (OpenAI's version) as (context, last word),
    through `datasets` (the hub or a datasets cache)."""
    rows = hub_dataset("EleutherAI/lambada_openai", "en", "test", "LAMBADA", "--prompts corpus")
    return [tuple(text.rsplit(" ", 1)) for text in rows["text"][:n]]


@dataclass
class ClassMass:
    before: Float[Tensor, "n_prompts 3"]  # next-token probability mass per class
    after: Float[Tensor, "n_prompts 3"]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per class: mean mass before and after over prompts, and after / before."""
        mean_before, mean_after = self.before.mean(0), self.after.mean(0)
        return {
            name: {
                "before": float(mean_before[i]),
                "after": float(mean_after[i]),
                "ratio": float(mean_after[i] / mean_before[i]) if mean_before[i] else None,
            }
            for i, name in enumerate(CLASSES)
        }


def class_mass(
    model: TransformerBridge | RuleModel,
    contexts: Sequence[Int[Tensor, "pos"]],
    classes: Int[Tensor, "d_vocab"],
    ablation: Sequence[WeightCoord],
) -> ClassMass:
    """Next-token probability mass per class after each context, before and after
    zeroing `ablation` (in memory on the fast twin, or streamed)."""
    masses = []
    for zeroed in ([], ablation):
        rows = [
            torch.zeros(len(CLASSES)).index_add_(0, classes, logits.float().softmax(-1))
            for logits in rule_model(model).next_token_logits(contexts, zeroed)
        ]
        masses.append(torch.stack(rows))
    return ClassMass(*masses)
