"""What every experiment on super weights shares: which weights it works on (given,
read from a locate results file, or found now by the search), and the head of its
results document."""

from dataclasses import asdict, dataclass
from pathlib import Path

from sw_lens.errors import SwLensError
from sw_lens.locate import LocateResult, locate, rank_by_effect, rule_model
from sw_lens.results import header, read_json
from sw_lens.search import SearchResult, search
from sw_lens.setup import LocateConfig, Setup, load
from sw_lens.vocabulary import WeightCoord


@dataclass
class Found:
    """What the job found: the spike rule's candidates, each measured, and (by default)
    the threshold-free search (`sw_lens.search`) that decides which weights are super."""

    rule: LocateResult
    search: SearchResult | None  # None when only the rule was asked for (``find="rule"``)

    @property
    def super_weights(self) -> list[WeightCoord]:
        """By effect, strongest first."""
        if self.search is None:
            return [c.coord for c in self.rule.super_weights]
        return [m.coord for m in self.search.super_weights]

    def describe(self, config: LocateConfig) -> str:
        if self.search is None:
            return (
                f"found by the spike rule on {len(config.prompts)} prompt(s), ranked on "
                f"{self.rule.ranking.n_tokens} tokens ({config.criterion.describe()})"
            )
        return (
            f"found by the threshold-free search ({len(self.search.measured)} weights "
            f"measured alone; super when the perplexity ratio on "
            f"{self.search.confirmation_tokens} tokens >= {config.criterion.min_ppl_ratio:g})"
        )


def find(setup: Setup, config: LocateConfig) -> Found:
    """The spike rule on the prompts, then either each of its candidates ranked by its
    effect (``find="rule"``) or the search, which measures them among the rest."""
    model, corpus = setup.model, setup.corpus.name
    rule = locate(model, setup.texts, setup.prompt_bos, config.criterion, config.iterations)
    if config.find == "search" and setup.streamed:
        rule.notes.append(
            "streamed: the threshold-free search needs gradients through the whole model, "
            "which a streamed run does not compute; the spike rule's candidates are ranked "
            "by their effect instead"
        )
    if config.find == "rule" or setup.streamed:
        return Found(rank_by_effect(model, rule, setup.tokens, setup.rank_protocol, corpus), None)
    result = search(
        model,
        setup.texts,
        setup.tokens,
        setup.rank_protocol,
        setup.protocol,
        corpus,
        rule=[c.coord for c in rule.candidates],
        given=config.weights,
        parameters=config.search,
        min_ppl_ratio=config.criterion.min_ppl_ratio,
        seed=config.seed,
    )
    by_coord = {m.coord: m for m in result.measured}
    for c in rule.candidates:
        m = by_coord[c.coord]
        c.ppl_alone, c.effect, c.is_super = m.ppl_alone, m.effect, m.is_super
    rule.candidates.sort(key=lambda c: -c.effect)
    rule.ranking = result.ranking
    return Found(rule, result)


def super_weights(
    setup: Setup, config: LocateConfig, results: str | None = None
) -> tuple[list[WeightCoord], str]:
    """The super weights an experiment works on, and how they were chosen: the weights
    given in `config`, else those of a locate `results` file for the same model, else
    what `find` finds now (the search, or the spike rule ranked by effect)."""
    if config.weights:
        return list(config.weights), "given (--weight)"
    if results:
        document = read_json(Path(results), kind="locate")
        if document.model.name != setup.loaded.name:
            raise SwLensError(
                f"results file '{results}' is for model {document.model.name!r}, "
                f"not {setup.loaded.name!r}"
            )
        coords = [WeightCoord(c.layer, c.row, c.col) for c in document.super_weights]
        rule_model(setup.model).check_coords(coords)
        source = f"super weights of {results}"
    else:
        found = find(setup, config)
        coords, source = found.super_weights, found.describe(config)
    if not coords:
        raise SwLensError(
            f"no super weight in {setup.loaded.name} ({source}); name one with --weight L,ROW,COL"
        )
    return coords, source


@dataclass
class Experiment:
    """An experiment on super weights, ready to run: the job, its loaded setup, the super
    weights it works on and how they were chosen."""

    config: LocateConfig
    setup: Setup
    coords: list[WeightCoord]
    source: str

    def document(self, kind: str) -> dict:
        """What every experiment's results document starts with."""
        setup, model = self.setup, rule_model(self.setup.model)
        return header(kind, setup.loaded, self.config.seed) | {
            "super_weights": [
                asdict(c) | {"value": model.weight(c)[0], "w_out_index": list(c.w_out_index)}
                for c in self.coords
            ],
            "super_weight_source": self.source,
            "execution": setup.execution(),
            "corpus": setup.corpus.name,
            "config": asdict(self.config),
        }


def prepare(
    config: LocateConfig, results: str | None = None, streamable: bool = False
) -> Experiment:
    """Load what `config` names (streamed, for an experiment that is `streamable`, when
    `config.stream` says so) and choose the super weights (`super_weights`)."""
    setup = load(config, streamable)
    return Experiment(config, setup, *super_weights(setup, config, results))
