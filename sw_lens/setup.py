"""What every job starts from: its configuration, the model, the corpus as tokens, the
perplexity protocol and the scanned prompts, all loaded and checked before long work."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pydantic
import torch
from jaxtyping import Int
from pydantic import Field
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoConfig

from sw_lens.corpora import DEFAULT_CORPUS, NAMED, Corpus, load_corpus, tokenize
from sw_lens.errors import SwLensError, untrusted_files
from sw_lens.locate import Criterion
from sw_lens.models import (
    DEFAULT_MODEL,
    DTYPES,
    EMBEDDED,
    LoadedModel,
    load_model,
    model_folder,
    resolve_device,
    resolve_dtype,
)
from sw_lens.options import Bos, PositiveInt, Seed, Text, Texts, keys, option, options_of
from sw_lens.patching import check_coords
from sw_lens.perplexity import Protocol, check_window
from sw_lens.predictions import CASE_STUDY_PROMPT
from sw_lens.resources import fits
from sw_lens.search import SearchParameters
from sw_lens.stream import StreamedModel, check_streamable, check_streamed_coords, open_streamed
from sw_lens.vocabulary import Coordinate

log = logging.getLogger(__name__)

PAPER_PROMPT = "Apple Inc. is a worldwide tech company."
STREAMED = "locate, controls, restore, scaling, stopwords and quantize"  # these stream


@pydantic.dataclasses.dataclass
class LocateConfig:
    """Every option of a job, declared once (`sw_lens.options`): the commands' options,
    the sweep files' keys and what a library user passes all come from these fields."""

    model: Text = option(
        DEFAULT_MODEL,
        "hub id (e.g. gpt2, Qwen/Qwen2.5-3B; HF cache works offline), HF-format directory, "
        f".gguf file, nanoGPT ckpt.pt, or embedded: {', '.join(EMBEDDED)}",
    )
    text: Text = option(
        DEFAULT_CORPUS, f"perplexity corpus: a UTF-8 file or one of {', '.join(NAMED)}"
    )
    prompts: Texts = option(
        [PAPER_PROMPT], "text to scan for spikes; repeat for several", flag="prompt", cli="append"
    )
    device: Text = option("auto", "cpu, cuda, cuda:N or auto", group="loading")
    device_map: Text | None = option(
        None,
        "spread the model over devices with accelerate instead: auto, balanced, "
        "balanced_low_0 or sequential (over the GPUs of this node), or a JSON file "
        '{"module": GPU index, "cpu" or "disk"}; offloaded (cpu, disk) modules load their '
        "weights for their own forward only",
        group="loading",
        metavar="MAP",
    )
    dtype: Literal[tuple(DTYPES)] = option("float32", "weights and compute", group="loading")
    window: PositiveInt = option(512, "tokens per window, BOS included")
    stride: PositiveInt | None = option(None, "sliding-window stride (default: non-overlapping)")
    batch_size: PositiveInt = option(4, "windows per forward")
    max_tokens: PositiveInt | None = option(4096, "corpus tokens for the reported perplexities")
    rank_tokens: PositiveInt = option(1024, "corpus tokens per effect ranking")
    bos: Bos = option(
        "auto", "prepend BOS to each corpus window (auto: as the model's tokenizer does)"
    )
    prompt_bos: Bos = option(
        "auto",
        "prepend BOS to each prompt: scanned, predicted, or a task's context (auto: as the "
        "model's tokenizer does; a model's own convention for prompts can differ from the "
        "one stated for the corpus)",
    )
    iterations: PositiveInt = option(
        5, "maximum scans of the spike rule (ablate, rescan)", group="rule"
    )
    criterion: Criterion = Field(default_factory=Criterion)
    find: Literal["search", "rule"] = option(
        "search",
        "how super weights are found: search (every down-projection weight screened by its "
        "largest contribution and its saliency, the top measured, recall stated; the spike "
        "rule reported alongside) or rule (the paper's spike rule alone)",
    )
    search: SearchParameters = Field(default_factory=SearchParameters)
    weights: list[Coordinate] = option(
        [],
        "a weight given by hand: HF down_proj.weight[ROW, COL] of layer LAYER; repeat for "
        "several (locate also zeroes it, e.g. a published super weight; an experiment takes "
        "these as the super weights)",
        flag="weight",
        metavar="LAYER,ROW,COL",
        cli="append",
    )
    trust_remote_code: bool = option(False, "allow a hub model's own code", group="loading")
    stream: Literal["auto", "on", "off"] = option(
        "auto",
        "read the model one decoder layer at a time from its checkpoint (safetensors or "
        ".gguf): when it does not fit the device whole (auto), always (on) or never (off); "
        f"{STREAMED} stream (the spike rule then finds the super weights: the search needs "
        "the whole model), the other experiments need the model in memory",
    )
    tokenizer: Text | None = option(
        None,
        "for nanoGPT .pt checkpoints: meta.pkl or an HF tokenizer (default: meta.pkl found "
        "beside the checkpoint or in data/<dataset>/, else GPT-2's BPE)",
        group="loading",
    )
    seed: Seed = option(0, "0 to 2**32 - 1")
    # Options of locate alone:
    prediction_prompt: Text = option(
        CASE_STUDY_PROMPT, "prompt of the next-token table", group="locate"
    )
    html_tokens: PositiveInt = option(
        256, "scored tokens shown on the token-loss page", group="locate"
    )
    top_channels: PositiveInt = option(
        16, "channels per hook in the spike-layer heatmap", group="locate"
    )
    check_known: Text | None = option(
        None,
        "compare with the registry of published super weights (by --model's name, or NAME, "
        "e.g. Qwen/Qwen2.5-3B for a local copy) and measure the published weights too",
        metavar="NAME",
        const="auto",
        group="locate",
    )
    registry: Text | None = option(
        None, "registry TOML file (default: sw_lens's own)", group="locate"
    )


# The options every experiment on super weights takes, and every run of a sweep file;
# loading a model and the spike rule are also options of explain, robustness and track.
LOADING = keys(LocateConfig, "loading")
RULE = keys(LocateConfig, "rule") + keys(Criterion, None)
JOB = tuple(o.key for o in options_of(LocateConfig) if o.key not in keys(LocateConfig, "locate"))


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
    """A loaded model with its corpus, protocol and scan prompts: what every job starts
    from. The model is in memory (a bridge), or, for locate, streamed from its checkpoint
    one decoder layer at a time (`sw_lens.stream`)."""

    loaded: LoadedModel | StreamedModel
    corpus: Corpus
    tokens: Int[Tensor, "n_tokens"]
    protocol: Protocol
    rank_protocol: Protocol  # the same with the ranking budget
    prompt_bos: bool  # whether prompts start with BOS (the corpus: `protocol.prepend_bos`)
    texts: list[Int[Tensor, "pos"]]  # the scanned prompts
    streaming: str | None = None  # why the model is streamed; None: it is in memory

    @property
    def streamed(self) -> bool:
        return self.streaming is not None

    @property
    def model(self) -> TransformerBridge | StreamedModel:
        return self.loaded if self.streamed else self.loaded.bridge

    @property
    def d_vocab(self) -> int:
        return self.loaded.d_vocab if self.streamed else self.loaded.bridge.cfg.d_vocab

    def execution(self) -> dict:
        """How the numbers were computed, as results documents record it."""
        if self.streamed:
            description = (
                "one decoder layer at a time from the checkpoint, every token's residual "
                "stream kept between layers (sw_lens.stream)"
            )
        elif self.loaded.device_map:
            description = "the whole model in memory, placed by accelerate's device map"
        else:
            description = "the whole model in memory"
        return {"streamed": self.streamed, "why": self.streaming, "description": description}


def load_configured_model(config: LocateConfig) -> LoadedModel:
    """The model `config` names, loaded as its loading options say."""
    return load_model(
        config.model,
        config.device,
        config.dtype,
        config.trust_remote_code,
        config.tokenizer,
        config.device_map,
    )


def streaming_reason(config: LocateConfig) -> str | None:
    """Why `config`'s model is to be streamed (`LocateConfig.stream`), or None: "auto"
    streams an HF-format model (embedded, folder, hub id) that does not fit the device
    whole, unless a device map places it; anything else loads in memory, which refuses in
    one line what does not fit."""
    if config.device_map is not None:  # placement chosen: accelerate's
        if config.stream == "on":
            raise SwLensError("--stream on and --device-map exclude each other: choose one")
        return None
    if config.stream != "auto":
        return "--stream on" if config.stream == "on" else None
    path = Path(config.model).expanduser()
    local = config.model in EMBEDDED or path.is_dir()
    gguf = path.is_file() and path.suffix == ".gguf"
    if path.exists() and not (local or gguf):  # a nanoGPT checkpoint loads in memory
        return None
    try:
        with untrusted_files(f"cannot read '{config.model}'"):
            if gguf:
                hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            else:  # a hub id: its config only, until it must stream
                hf_config = AutoConfig.from_pretrained(
                    model_folder(config.model)[1] if local else config.model
                )
            device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
            whole = fits(hf_config, device, dtype)
    except SwLensError:  # the in-memory load says, in one line, what is wrong
        return None
    return None if whole else f"the model does not fit {device} whole in {config.dtype}"


def load(config: LocateConfig, streamable: bool = False) -> Setup:
    """Load and check everything `config` names, before any long work starts; with
    `streamable` (`STREAMED`), a model is streamed when `config.stream` says so."""
    torch.manual_seed(config.seed)
    if not streamable and config.stream == "on":
        raise SwLensError(
            f"--stream on: this command needs the whole model ({STREAMED} stream); spread it "
            f"over GPUs with --device-map instead"
        )
    reason = streaming_reason(config) if streamable else None
    if reason:
        device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        loaded = open_streamed(config.model, device, dtype)
        log.info(
            "streaming %s one decoder layer at a time from %s (%s)",
            loaded.name,
            loaded.folder,
            reason,
        )
        check_streamed_coords(loaded, config.weights)
        n_ctx, d_vocab = loaded.n_ctx, loaded.d_vocab
    else:
        loaded = load_configured_model(config)
        check_coords(loaded.bridge, config.weights)
        n_ctx, d_vocab = loaded.bridge.cfg.n_ctx, loaded.bridge.cfg.d_vocab
    protocol = Protocol(
        config.window,
        config.stride,
        resolve_bos(config.bos, loaded),
        config.max_tokens,
        config.batch_size,
    )
    prompt_bos = resolve_bos(config.prompt_bos, loaded)
    check_window(n_ctx, protocol)
    corpus = load_corpus(config.text)
    tokens = tokenize(loaded.tokenizer, corpus.text, d_vocab, token_budget(config))
    if reason:
        used = min(len(tokens), token_budget(config) or len(tokens))  # what a pass keeps
        check_streamable(loaded, used, config.window, config.batch_size)
    return Setup(
        loaded=loaded,
        corpus=corpus,
        tokens=tokens,
        protocol=protocol,
        rank_protocol=replace(protocol, max_tokens=config.rank_tokens),
        prompt_bos=prompt_bos,
        texts=prompt_tokens(loaded, config.prompts, prompt_bos),
        streaming=reason,
    )
