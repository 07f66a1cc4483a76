"""The whole job behind ``experiments/locate.py``: load, scan, locate, rank, evaluate.

The orchestrator: it imports the library's stories and nothing in the library imports it.

It returns the results document (a plain dict, see `results`) so that the command line,
sweeps and notebooks all share one implementation; printing and file writing stay with
the caller.
"""

import logging
from dataclasses import asdict

from sw_lens.experiment import find
from sw_lens.locate import Candidate, LocateResult
from sw_lens.models import LoadedModel
from sw_lens.outliers import weight_distribution
from sw_lens.patching import ablation_hooks
from sw_lens.perplexity import (
    PerplexityResult,
    evaluate,
    paired_token_loss,
)
from sw_lens.predictions import top_predictions
from sw_lens.registry import (
    CONVENTION,
    REGISTRY,
    KnownModel,
    check_fits,
    check_known,
    load_registry,
    lookup,
)
from sw_lens.results import SCHEMA_VERSION, provenance
from sw_lens.scan import ScanResult, layer_activations
from sw_lens.setup import LocateConfig, load, prompt_tokens
from sw_lens.vocabulary import WeightCoord

log = logging.getLogger(__name__)


def _ablation_entry(label: str, coords, result: PerplexityResult, baseline: PerplexityResult):
    """One row of the perplexity table, with its protocol like every perplexity we save."""
    return {
        "label": label,
        "weights": [asdict(c) for c in coords],
        "ratio": result.perplexity / baseline.perplexity,
    } | result.to_dict()


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


def run_locate(config: LocateConfig) -> dict:
    """Run the locate job and return its results document."""
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
        "model": loaded.description(),
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
