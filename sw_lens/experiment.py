"""What every experiment on super weights shares: which weights it works on (given,
read from a locate results file, or found now by the locate rule and ranked), and the
head of its results document."""

from dataclasses import asdict
from pathlib import Path

from sw_lens.errors import SwLensError
from sw_lens.locate import LocateResult, locate, rank_by_effect
from sw_lens.patching import check_coords, weight_value
from sw_lens.results import SCHEMA_VERSION, provenance, read_json
from sw_lens.setup import LocateConfig, Setup
from sw_lens.vocabulary import WeightCoord


def find(setup: Setup, config: LocateConfig) -> LocateResult:
    """The locate rule on the prompts, then each candidate ranked by its effect."""
    found = locate(setup.model, setup.texts, setup.prepend_bos, config.criterion, config.iterations)
    return rank_by_effect(setup.model, found, setup.tokens, setup.rank_protocol, setup.corpus.name)


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
        "model": setup.loaded.description(),
        "super_weights": [
            asdict(c) | {"value": weight_value(model, c), "w_out_index": list(c.w_out_index)}
            for c in coords
        ],
        "super_weight_source": source,
        "corpus": setup.corpus.name,
        "config": asdict(config),
        "provenance": provenance(setup.loaded.device, setup.loaded.dtype, config.seed),
    }
