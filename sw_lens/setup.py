"""What every job starts from: its configuration, the model, the corpus as tokens, the
perplexity protocol and the scanned prompts, all loaded and checked before long work."""

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.corpora import DEFAULT_CORPUS, Corpus, load_corpus, tokenize
from sw_lens.errors import SwLensError
from sw_lens.locate import Criterion
from sw_lens.models import DEFAULT_MODEL, LoadedModel, load_model
from sw_lens.patching import check_coords
from sw_lens.perplexity import Protocol, check_window
from sw_lens.predictions import CASE_STUDY_PROMPT
from sw_lens.vocabulary import WeightCoord

PAPER_PROMPT = "Apple Inc. is a worldwide tech company."


@dataclass
class LocateConfig:
    model: str = DEFAULT_MODEL
    text: str = DEFAULT_CORPUS  # perplexity corpus: a named corpus or a file
    prompts: list[str] = field(default_factory=lambda: [PAPER_PROMPT])  # scanned texts
    device: str = "auto"
    dtype: str = "float32"
    window: int = 512
    stride: int | None = None
    batch_size: int = 4
    max_tokens: int | None = 4096  # perplexity budget of the reported numbers
    rank_tokens: int = 1024  # budget of the per-candidate effect ranking
    bos: str = "auto"  # "auto" (the tokenizer's own convention), "yes" or "no"
    iterations: int = 5
    criterion: Criterion = field(default_factory=Criterion)
    weights: list[WeightCoord] = field(default_factory=list)  # also measured, e.g. published
    prediction_prompt: str = CASE_STUDY_PROMPT  # top-k next tokens before/after
    html_tokens: int = 256  # scored tokens shown on the token-loss page
    top_channels: int = 16  # channels per hook in the spike-layer heatmap
    trust_remote_code: bool = False
    tokenizer: str | None = None  # nanoGPT: meta.pkl or an HF tokenizer
    seed: int = 0
    check_known: str | None = None  # compare with the registry: "auto" (by model name) or a name
    registry: str | None = None  # a registry file; None: the packaged one


def resolve_bos(bos: str, loaded: LoadedModel) -> bool:
    """Whether to prepend BOS: "auto" follows the model's tokenizer, "yes"/"no" override."""
    if bos not in {"auto", "yes", "no"}:
        raise SwLensError(f"bos must be auto, yes or no, got {bos!r}")
    if bos == "auto":
        return loaded.adds_bos
    return bos == "yes"


def prompt_tokens(loaded: LoadedModel, prompts: list[str], prepend_bos: bool) -> list[torch.Tensor]:
    if not prompts or not all(p.strip() for p in prompts):
        raise SwLensError("every prompt must contain text")
    bos = [loaded.tokenizer.bos_token_id] if prepend_bos else []
    return [
        torch.cat([torch.tensor(bos, dtype=torch.long), tokenize(loaded.tokenizer, p)])
        for p in prompts
    ]


def token_budget(config: LocateConfig) -> int | None:
    """Corpus tokens any measurement of `config` reads (None: all): the reported and the
    ranking budgets, and at least one window, which `windows` asks of the corpus."""
    if config.max_tokens is None:
        return None
    return max(config.max_tokens, config.rank_tokens, config.window)


@dataclass
class Setup:
    """A loaded model with its corpus, protocol and scan prompts: what every job starts from."""

    loaded: LoadedModel
    corpus: Corpus
    tokens: Int[Tensor, "n_tokens"]
    protocol: Protocol
    rank_protocol: Protocol  # the same with the ranking budget
    prepend_bos: bool
    texts: list[Int[Tensor, "pos"]]  # the scanned prompts

    @property
    def model(self) -> TransformerBridge:
        return self.loaded.bridge


def load(config: LocateConfig) -> Setup:
    """Load and check everything `config` names, before any long work starts."""
    torch.manual_seed(config.seed)
    loaded = load_model(
        config.model, config.device, config.dtype, config.trust_remote_code, config.tokenizer
    )
    check_coords(loaded.bridge, config.weights)
    prepend_bos = resolve_bos(config.bos, loaded)
    protocol = Protocol(
        config.window, config.stride, prepend_bos, config.max_tokens, config.batch_size
    )
    check_window(loaded.bridge, protocol)
    corpus = load_corpus(config.text)
    return Setup(
        loaded=loaded,
        corpus=corpus,
        tokens=tokenize(
            loaded.tokenizer, corpus.text, loaded.bridge.cfg.d_vocab, token_budget(config)
        ),
        protocol=protocol,
        rank_protocol=replace(protocol, max_tokens=config.rank_tokens),
        prepend_bos=prepend_bos,
        texts=prompt_tokens(loaded, config.prompts, prepend_bos),
    )
