"""The whole job behind ``experiments/locate.py``: load, scan, locate, rank, evaluate.

The orchestrator: it imports the library's stories and nothing in the library imports it.

It returns the results document (a plain dict, see `results`) so that the command line,
sweeps and notebooks all share one implementation; printing and file writing stay with
the caller.
"""

import logging
from dataclasses import asdict, astuple

from sw_lens.documents import Locate
from sw_lens.errors import SwLensError
from sw_lens.experiment import Found, find
from sw_lens.locate import Candidate, LocateResult, rule_model
from sw_lens.models import LoadedModel
from sw_lens.outliers import weight_distribution
from sw_lens.patching import ablation_hooks
from sw_lens.perplexity import PerplexityResult, paired_token_loss
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
from sw_lens.results import header, typed
from sw_lens.scan import ScanResult, layer_activations, weight_spikes
from sw_lens.search import SearchResult
from sw_lens.setup import LocateConfig, Setup, load, prompt_tokens
from sw_lens.stream import top_predictions as streamed_predictions
from sw_lens.vocabulary import (
    WeightCoord,
    hook_down_out,
    hook_mlp_out,
    stored_index,
)

log = logging.getLogger(__name__)


def _ablation_entry(label: str, coords, result: PerplexityResult, baseline: PerplexityResult):
    """One row of the perplexity table, with its protocol like every perplexity we save."""
    return {
        "label": label,
        "weights": [asdict(c) for c in coords],
        "ratio": result.perplexity / baseline.perplexity,
    } | result.to_dict()


def _weight_dict(coord: WeightCoord, setup: Setup) -> dict:
    """The weight's value and its index in every layout we name."""
    value, hf_param, linear = rule_model(setup.model).weight(coord)
    checkpoint_param, checkpoint_index = setup.loaded.checkpoint_weight(*astuple(coord))
    return {
        **asdict(coord),
        "value": value,
        "w_out_index": list(coord.w_out_index),
        "hf_param": hf_param,
        "hf_index": list(stored_index(coord, linear)),
        "checkpoint_param": checkpoint_param,  # in the loaded file's own layout
        "checkpoint_index": list(checkpoint_index),
    }


def candidate_dict(c: Candidate, setup: Setup) -> dict:
    return _weight_dict(c.coord, setup) | {
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


def _activations(model, texts: list, coord: WeightCoord) -> dict:
    """For a weight the rule did not name: its super activation on the prompts (the
    largest |output| in its row) and its input there."""
    post, out = weight_spikes(model, texts, coord)
    return {
        "iteration": None,
        "role": None,
        "token": out.token,
        "input_activation": asdict(post),
        "output_activation": asdict(out),
        "resid_mid": None,
    }


def ablation_sets(
    found: Found, given: list[WeightCoord], published: list[WeightCoord] = ()
) -> list[tuple[str, list]]:
    """What the report measures at the full budget: each super weight alone (strongest
    first, so the first set is the headline of the figures and pages), each given and
    each published weight alone (unless already measured), then all super weights
    together (all of the rule's candidates when none is super)."""
    supers = found.super_weights
    sets = [(str(c), [c]) for c in supers]
    measured = set(supers)
    for label, coords in (("given", given), ("published", published)):
        for coord in coords:
            if coord not in measured:
                sets.append((f"{coord} ({label})", [coord]))
                measured.add(coord)
    if len(supers) > 1:
        sets.append(("all super weights", supers))
    elif not supers and found.rule.candidates:
        sets.append(("all candidates", [c.coord for c in found.rule.candidates]))
    return sets


def report_ablations(setup, sets: list, search: SearchResult | None) -> tuple:
    """The baseline and each set's perplexity on the reported budget, in one sweep; a
    single weight the search already measured on that budget is not measured again."""
    done = search.confirmed if search else {}
    todo = [coords for _, coords in sets if not (len(coords) == 1 and coords[0] in done)]
    if todo or not done:
        corpus = setup.corpus.name
        baseline, results = rule_model(setup.model).sweep(
            setup.tokens, setup.protocol, corpus, todo, "report"
        )
    else:
        baseline, results = search.confirmation, []
    fresh = iter(results)
    measured = [
        (label, coords, done[coords[0]] if len(coords) == 1 and coords[0] in done else next(fresh))
        for label, coords in sets
    ]
    return baseline, measured


def headline(found: Found, measured: list) -> tuple | None:
    """The ablation the token-loss page and the predictions show: the strongest super
    weight alone; with none, the measured set with the largest effect."""
    if not measured:
        return None
    if found.super_weights:
        return measured[0]
    return max(measured, key=lambda m: m[2].perplexity)


def super_weight_dict(coord: WeightCoord, found: Found, setup: Setup) -> dict:
    """A super weight as the document records it: where it is in every layout, its
    activations on the prompts, and how the search found and measured it."""
    rule = {c.coord: c for c in found.rule.candidates}
    if coord in rule:
        entry = candidate_dict(rule[coord], setup)
    else:  # found by the search, which runs in memory only
        entry = _weight_dict(coord, setup) | _activations(setup.model, setup.texts, coord)
    if found.search is not None:
        m = next(m for m in found.search.measured if m.coord == coord)
        entry |= {
            "found_by": m.found_by,
            "contribution_rank": m.contribution_rank,
            "saliency_rank": m.saliency_rank,
            "effect": m.confirmed_effect,
            "ranking_effect": m.effect,
            "is_super": m.is_super,
        }
    return entry


def search_dict(result: SearchResult, rule: LocateResult) -> dict:
    """The search's parameters, what it measured and its recall."""
    rule_coords = {c.coord for c in rule.candidates}
    supers = result.super_weights
    beyond = [m for m in result.measured if set(m.found_by) <= {"walk", "sample"}]
    return {
        "parameters": asdict(result.parameters),
        "verdict": result.verdict(),
        "n_measured": len(result.measured),
        "ranking": result.ranking.to_dict(),
        "confirmation": result.confirmation and result.confirmation.to_dict(),
        "stop_rank": result.stop_rank,
        "stop_reason": result.stop_reason,
        "screen_overlap": result.screen_overlap,
        "largest_beyond_screens": max((m.effect for m in beyond), default=None),
        "sample_max": result.sample_max,
        "widened": result.widened,
        "ranking_noise": result.ranking_noise,
        "warnings": result.warnings,
        # A weight that matters but that neither screen ranked in its top: a finding.
        "missed_by_screens": [
            asdict(m.coord) | {"found_by": m.found_by}
            for m in supers
            if not {"contribution", "saliency"} & set(m.found_by)
        ],
        "rule_recall": {
            "found": sum(m.coord in rule_coords for m in supers),
            "of": len(supers),
            "missed": [asdict(m.coord) for m in supers if m.coord not in rule_coords],
        },
        "measured": [
            asdict(m.coord) | {k: v for k, v in asdict(m).items() if k != "coord"}
            for m in result.measured
        ],
    }


def token_loss(loaded: LoadedModel, tokens, baseline, headline, config: LocateConfig) -> dict:
    """Per-token loss before/after the headline ablation, for the token-loss page."""
    label, coords, ablated = headline
    paired = paired_token_loss(loaded.tokenizer, tokens, baseline, ablated, config.html_tokens)
    return {"label": label, "weights": [asdict(c) for c in coords]} | paired


def predictions(setup: Setup, ids, headline, config: LocateConfig) -> dict:
    """Top-k next tokens on the case-study prompt before/after the headline ablation."""
    label, coords, _ = headline
    model = setup.model
    if setup.streamed:
        before, after = streamed_predictions(model, ids), streamed_predictions(model, ids, coords)
    else:
        before = top_predictions(model, ids)
        after = top_predictions(model, ids, fwd_hooks=ablation_hooks(model, coords))
    return {"prompt": config.prediction_prompt, "label": label, "before": before, "after": after}


def scan_dict(result: ScanResult, prompts: list[str]) -> dict:
    return {
        "prompts": prompts,
        "prepend_bos": result.prepend_bos,
        "n_tokens": result.n_tokens,
        # Which hooks the spikes were read at: the down-projection's own output, and what
        # the MLP adds to the residual stream (the same tensor unless a norm follows it).
        "output_hook": hook_down_out("{l}"),
        "added_hook": hook_mlp_out("{l}"),
        "layers": [asdict(s) | {"cancels": s.cancels} for s in result.layers],
    }


def known_entry(config: LocateConfig, setup: Setup) -> KnownModel | None:
    """The registry entry to compare with (checked against the model's shape before any
    work is done), or None when not asked or not listed."""
    if not config.check_known:
        return None
    if setup.streamed:
        raise SwLensError("--check-known needs the model in memory: use --stream off")
    loaded = setup.loaded
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


def run_locate(config: LocateConfig) -> Locate:
    """Run the locate job and return its results document."""
    setup = load(config, streamable=True)
    loaded, model, tokens, corpus = setup.loaded, setup.model, setup.tokens, setup.corpus
    protocol, prompt_bos, texts = setup.protocol, setup.prompt_bos, setup.texts
    known = known_entry(config, setup)
    found = find(setup, config)
    rule = found.rule

    log.info("perplexity on %s: %s", corpus.name, protocol.describe())
    published = [w.coord for w in known.weights] if known else []
    baseline, measured = report_ablations(
        setup, ablation_sets(found, config.weights, published), found.search
    )
    top = headline(found, measured)
    prediction_ids = prompt_tokens(loaded, [config.prediction_prompt], prompt_bos)[0]
    candidates = [candidate_dict(c, setup) for c in rule.candidates]
    supers = [super_weight_dict(c, found, setup) for c in found.super_weights]
    shown = [] if setup.streamed else supers or candidates  # strongest first
    per_layer: dict[int, dict] = {}  # the strongest shown weight of each layer
    for w in shown:
        per_layer.setdefault(w["layer"], w)

    return typed(
        header("locate", loaded, config.seed)
        | {
            "config": asdict(config),
            "scan": scan_dict(rule.scans[0], config.prompts),
            "criterion": config.criterion.to_dict(),
            "iterations": len(rule.scans),
            "termination": rule.termination,
            "notes": rule.notes,
            "candidates": candidates,
            "super_weights": supers,
            "super_weight_source": found.describe(config),
            "search": found.search and search_dict(found.search, rule),
            "ranking": rule.ranking.to_dict(),
            "perplexity": {
                "baseline": baseline.to_dict(),
                "ablations": [_ablation_entry(*m, baseline) for m in measured],
            },
            "token_loss": top and token_loss(loaded, tokens, baseline, top, config),
            "predictions": top and predictions(setup, prediction_ids, top, config),
            # In memory only: the spike layer's top channels and the weights' matrices.
            "layer_activations": [  # on the text where that weight's input spikes
                asdict(
                    layer_activations(
                        model, texts[w["input_activation"]["text"]], layer, config.top_channels
                    )
                )
                for layer, w in sorted(per_layer.items())
            ],
            "weight_distributions": [
                asdict(weight_distribution(model, WeightCoord(w["layer"], w["row"], w["col"])))
                for w in shown
            ],
            "known": config.check_known and known_dict(config, known, model, rule),
            "execution": setup.execution(),
        }
    )
