"""The whole job behind ``experiments/locate.py``: load, scan, locate, rank, evaluate.

It returns the results document (a plain dict, see `results`) so that the command line,
sweeps and notebooks all share one implementation; printing and file writing stay with
the caller.
"""

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.corpora import DEFAULT_CORPUS, Corpus, load_corpus, tokenize
from sw_lens.errors import SwLensError
from sw_lens.locate import Candidate, Criterion, LocateResult, locate, rank_by_effect
from sw_lens.models import DEFAULT_MODEL, LoadedModel, load_model
from sw_lens.outliers import weight_distribution
from sw_lens.patching import ablation_hooks, check_coords, weight_value
from sw_lens.perplexity import (
    PerplexityResult,
    Protocol,
    check_window,
    evaluate,
    paired_token_loss,
)
from sw_lens.predictions import CASE_STUDY_PROMPT, top_predictions
from sw_lens.registry import (
    CONVENTION,
    REGISTRY,
    KnownModel,
    check_fits,
    check_known,
    load_registry,
    lookup,
)
from sw_lens.results import SCHEMA_VERSION, provenance, read_json
from sw_lens.scan import ScanResult, layer_activations
from sw_lens.vocabulary import WeightCoord

log = logging.getLogger(__name__)

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


def _ablation_entry(label: str, coords, result: PerplexityResult, baseline: PerplexityResult):
    """One row of the perplexity table."""
    return {
        "label": label,
        "weights": [asdict(c) for c in coords],
        "perplexity": result.perplexity,
        "nll": result.nll,
        "ratio": result.perplexity / baseline.perplexity,
        "n_tokens": result.n_tokens,
    }


def model_dict(loaded: LoadedModel) -> dict:
    """What every results document says about the model it measured."""
    cfg = loaded.bridge.cfg
    return {
        "name": loaded.name,
        "source": loaded.source,
        "location": loaded.location,
        "architecture": type(loaded.bridge.original_model).__name__,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "iter_num": loaded.iter_num,
    }


def candidate_dict(c: Candidate, loaded: LoadedModel) -> dict:
    layer, row, col = c.coord.layer, c.coord.row, c.coord.col
    checkpoint_param, checkpoint_index = loaded.checkpoint_weight(layer, row, col)
    return {
        "layer": layer,
        "row": row,
        "col": col,
        "value": c.value,
        "w_out_index": list(c.coord.w_out_index),
        "hf_param": c.hf_param,
        "hf_index": list(c.hf_index),
        "checkpoint_param": checkpoint_param,  # in the loaded file's own layout
        "checkpoint_index": list(checkpoint_index),
        "iteration": c.iteration,
        "role": c.role,
        "token": c.mlp_out.token,
        "input_activation": asdict(c.post),
        "output_activation": asdict(c.mlp_out),
        "resid_mid": c.resid_mid,
        "ppl_alone": c.ppl_alone,
        "effect": c.effect,
        "is_super": c.is_super,
    }


def ablation_sets(
    found: LocateResult, given: list[WeightCoord], published: list[WeightCoord] = ()
) -> list[tuple[str, list]]:
    """What the report measures at the full budget: each super weight alone, each given
    and each published weight alone (unless already measured), then all super weights
    together (all candidates when none is super). The last set, when there is one, is the
    headline ablation of the figures."""
    sets = [(str(c.coord), [c.coord]) for c in found.super_weights]
    measured = {c.coord for c in found.super_weights}
    for label, coords in (("given", given), ("published", published)):
        for coord in coords:
            if coord not in measured:
                sets.append((f"{coord} ({label})", [coord]))
                measured.add(coord)
    if len(found.super_weights) > 1:
        sets.append(("all super weights", [c.coord for c in found.super_weights]))
    elif not found.super_weights and found.candidates:
        sets.append(("all candidates", [c.coord for c in found.candidates]))
    return sets


def token_loss(loaded: LoadedModel, tokens, baseline, headline, config: LocateConfig) -> dict:
    """Per-token loss before/after the headline ablation, for the token-loss page."""
    label, coords, ablated = headline
    paired = paired_token_loss(loaded.tokenizer, tokens, baseline, ablated, config.html_tokens)
    return {"label": label, "weights": [asdict(c) for c in coords]} | paired


def predictions(model, ids, headline, config: LocateConfig) -> dict:
    """Top-k next tokens on the case-study prompt before/after the headline ablation."""
    label, coords, _ = headline
    return {
        "prompt": config.prediction_prompt,
        "label": label,
        "before": top_predictions(model, ids),
        "after": top_predictions(model, ids, fwd_hooks=ablation_hooks(model, coords)),
    }


def scan_dict(result: ScanResult, prompts: list[str]) -> dict:
    return {
        "prompts": prompts,
        "prepend_bos": result.prepend_bos,
        "n_tokens": result.n_tokens,
        "layers": [asdict(s) | {"cancels": s.cancels} for s in result.layers],
    }


def known_entry(config: LocateConfig, loaded: LoadedModel) -> KnownModel | None:
    """The registry entry to compare with (checked against the model's shape before any
    work is done), or None when not asked or not listed."""
    if not config.check_known:
        return None
    name = loaded.name if config.check_known == "auto" else config.check_known
    known = lookup(load_registry(config.registry), name)
    if known is not None:
        check_fits(loaded.bridge, known)
    return known


def known_dict(config: LocateConfig, known: KnownModel | None, model, found: LocateResult):
    return {
        "registry": config.registry or str(REGISTRY),
        "entry": known and known.name,
        "convention": CONVENTION,
        "checks": [asdict(c) for c in check_known(model, known, found.candidates)],
    }


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


def find(setup: Setup, config: LocateConfig) -> LocateResult:
    """The locate rule on the prompts, then each candidate ranked by its effect."""
    found = locate(setup.model, setup.texts, setup.prepend_bos, config.criterion, config.iterations)
    return rank_by_effect(setup.model, found, setup.tokens, setup.rank_protocol, setup.corpus.name)


def run_locate(config: LocateConfig) -> dict:
    """Run the pipeline and return its results document."""
    setup = load(config)
    loaded, model, tokens, corpus = setup.loaded, setup.model, setup.tokens, setup.corpus
    protocol, prepend_bos, texts = setup.protocol, setup.prepend_bos, setup.texts
    known = known_entry(config, loaded)
    found = find(setup, config)

    log.info("perplexity on %s: %s", corpus.name, protocol.describe())
    baseline = evaluate(model, tokens, protocol, corpus.name, desc="baseline")
    measured = []
    published = [w.coord for w in known.weights] if known else []
    for label, coords in ablation_sets(found, config.weights, published):
        measured.append(
            (label, coords, evaluate(model, tokens, protocol, corpus.name, coords, desc=label))
        )
    shown = found.super_weights or found.candidates
    headline = measured[-1] if measured else None
    prediction_ids = prompt_tokens(loaded, [config.prediction_prompt], prepend_bos)[0]

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "locate",
        "model": model_dict(loaded),
        "config": asdict(config),
        "scan": scan_dict(found.scans[0], config.prompts),
        "criterion": asdict(config.criterion) | {"description": config.criterion.describe()},
        "iterations": len(found.scans),
        "termination": found.termination,
        "notes": found.notes,
        "candidates": [candidate_dict(c, loaded) for c in found.candidates],
        "super_weights": [candidate_dict(c, loaded) for c in found.super_weights],
        "ranking": found.ranking.to_dict(),
        "perplexity": {
            "baseline": baseline.to_dict(),
            "ablations": [_ablation_entry(*m, baseline) for m in measured],
        },
        "token_loss": headline and token_loss(loaded, tokens, baseline, headline, config),
        "predictions": headline and predictions(model, prediction_ids, headline, config),
        "layer_activations": [
            asdict(layer_activations(model, texts[c.post.text], layer, config.top_channels))
            for layer, c in sorted({c.coord.layer: c for c in shown}.items())
        ],
        "weight_distributions": [asdict(weight_distribution(model, c.coord)) for c in shown],
        "known": config.check_known and known_dict(config, known, model, found),
        "provenance": provenance(loaded.device, loaded.dtype, config.seed),
    }


def super_weights(
    setup: Setup, config: LocateConfig, results: str | None = None
) -> tuple[list[WeightCoord], str]:
    """The super weights an experiment works on, and how they were chosen: the weights
    given in `config`, else those of a locate `results` file for the same model, else
    what the locate rule finds and ranks now."""
    if config.weights:
        return list(config.weights), "given (--weight)"
    if results:
        document = read_json(Path(results), kind="locate")
        if document["model"]["name"] != setup.loaded.name:
            raise SwLensError(
                f"results file '{results}' is for model {document['model']['name']!r}, "
                f"not {setup.loaded.name!r}"
            )
        coords = [WeightCoord(c["layer"], c["row"], c["col"]) for c in document["super_weights"]]
        check_coords(setup.model, coords)
        source = f"super weights of {results}"
    else:
        found = find(setup, config)
        coords = [c.coord for c in found.super_weights]
        source = (
            f"found by the locate rule on {len(config.prompts)} prompt(s), ranked on "
            f"{found.ranking.n_tokens} tokens ({config.criterion.describe()})"
        )
    if not coords:
        raise SwLensError(
            f"no super weight in {setup.loaded.name} ({source}); name one with --weight L,ROW,COL"
        )
    return coords, source


def experiment_document(
    kind: str, setup: Setup, config: LocateConfig, coords: list[WeightCoord], source: str
) -> dict:
    """What every experiment's results document starts with."""
    model = setup.model
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "model": model_dict(setup.loaded),
        "super_weights": [
            asdict(c) | {"value": weight_value(model, c), "w_out_index": list(c.w_out_index)}
            for c in coords
        ],
        "super_weight_source": source,
        "corpus": setup.corpus.name,
        "config": asdict(config),
        "provenance": provenance(setup.loaded.device, setup.loaded.dtype, config.seed),
    }
