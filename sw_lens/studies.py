"""The experiments on super weights, each as one function from its options to its results
document; the commands in ``experiments/`` parse options, call one of these, print and
save. Each experiment's own options are a dataclass here (`sw_lens.options`), so the
command line and any caller take the same, checked values.

The measurements themselves live in their own modules (controls, restore, stopwords,
quantize, decompose, robustness); this module only sets them up and writes down what
they measured.
"""

from dataclasses import asdict, replace
from functools import partial
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BeforeValidator

from sw_lens import documents
from sw_lens.circuit import circuit, circuit_dict
from sw_lens.controls import run_controls
from sw_lens.corpora import load_corpus, sentences, tokenize
from sw_lens.decompose import decompose
from sw_lens.experiment import Experiment
from sw_lens.locate import locate, rule_model
from sw_lens.options import (
    Finite,
    FiniteList,
    Fraction,
    NonNegativeInt,
    PositiveInt,
    Text,
    option,
)
from sw_lens.perplexity import windows
from sw_lens.predictions import CASE_STUDY_PROMPT, accuracy, top_tokens
from sw_lens.progress import bar
from sw_lens.quantize import CLIPS, METHODS, Scheme, quantized_perplexity
from sw_lens.restore import restore
from sw_lens.results import header, typed
from sw_lens.robustness import robustness
from sw_lens.setup import (
    LOADING,
    RULE,
    LocateConfig,
    load_configured_model,
    prompt_tokens,
    resolve_bos,
)
from sw_lens.stopwords import (
    STOPWORD_SOURCE,
    class_mass,
    lambada,
    last_word_contexts,
    token_classes,
)

# --- controls -------------------------------------------------------------------------------


@pydantic.dataclasses.dataclass
class ControlsOptions:
    n_largest: NonNegativeInt = option(7000, "N of control (b)")
    draws: NonNegativeInt = option(10, "R random draws of control (d)")
    pool: PositiveInt = option(
        100, "(d) draws from this many weights nearest in |w| to each super weight"
    )
    scales: FiniteList = option([0.5, 2.0], "factors of (e), comma-separated")


def controls_study(experiment: Experiment, options: ControlsOptions) -> documents.Controls:
    setup = experiment.setup
    baseline, rows, draws = run_controls(
        setup.model,
        setup.tokens,
        setup.protocol,
        setup.corpus.name,
        experiment.coords,
        n_largest=options.n_largest,
        draws=options.draws,
        scales=options.scales,
        pool=options.pool,
        seed=experiment.config.seed,
    )
    return typed(
        experiment.document("controls")
        | {"baseline": baseline.to_dict(), "controls": [asdict(r) for r in rows], "summary": draws}
    )


# --- restore --------------------------------------------------------------------------------


@pydantic.dataclasses.dataclass
class RestoreOptions:
    fraction: Finite = option(
        0.1, "restore where |unablated output| >= this x the super activation"
    )


def restore_study(experiment: Experiment, options: RestoreOptions) -> documents.Restore:
    setup = experiment.setup
    result = restore(
        setup.model,
        setup.tokens,
        setup.protocol,
        setup.corpus.name,
        experiment.coords,
        setup.texts,
        options.fraction,
    )
    return typed(
        experiment.document("restore")
        | {
            "fraction": options.fraction,
            "super_activations": [
                {
                    "layer": layer,
                    "row": row,
                    "value": value,
                    "threshold": result.thresholds[layer, row],
                }
                for (layer, row), value in result.super_activations.items()
            ],
            "baseline": result.baseline.to_dict(),
            "zeroed": result.ablated.to_dict(),
            "restored": result.restored.to_dict(),
            "recovered": result.recovered,
        }
    )


# --- scaling --------------------------------------------------------------------------------

FACTORS = [0.0, 0.25, 0.5, 0.75, 0.8, 0.9, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0]


@pydantic.dataclasses.dataclass
class ScalingOptions:
    factors: FiniteList = option(FACTORS, "factors of the super weights, comma-separated")
    task_prompts: NonNegativeInt = option(
        100, "sentences of --text for next-word accuracy (0: no accuracy)"
    )


def scaling_study(experiment: Experiment, options: ScalingOptions) -> documents.Scaling:
    """Perplexity at every factor in one sweep, and next-word accuracy on corpus sentences
    with the last word held out (top-1 next token = the word's first token, as LAMBADA
    scores)."""
    setup, coords, model = experiment.setup, experiment.coords, rule_model(experiment.setup.model)
    factors = [f for f in options.factors if f != 1.0]  # x1 is the baseline, measured anyway
    baseline, scaled = model.sweep(
        setup.tokens, setup.protocol, setup.corpus.name, [coords] * len(factors), "scaling", factors
    )
    points = [{"scale": 1.0, **baseline.to_dict()}] + [
        {"scale": factor, **result.to_dict()}
        for factor, result in zip(factors, scaled, strict=True)
    ]
    points.sort(key=lambda point: point["scale"])
    task = None
    if options.task_prompts > 0:
        pairs = last_word_contexts(sentences(setup.corpus.text, options.task_prompts))
        contexts = prompt_tokens(setup.loaded, [c for c, _ in pairs], setup.prompt_bos)
        targets = [int(tokenize(setup.loaded.tokenizer, " " + word)[0]) for _, word in pairs]
        for point in points:
            point["accuracy"] = asdict(
                accuracy(model.next_token_logits(contexts, coords, point["scale"]), targets)
            )
        task = {
            "description": "next-word accuracy: the top-1 next token is the first token of "
            "the held-out last word",
            "source": f"{setup.corpus.name} sentences",
            "n_prompts": len(pairs),
        }
    return typed(
        experiment.document("scaling")
        | {"baseline": baseline.to_dict(), "scaling": points, "task": task}
    )


# --- stopwords ------------------------------------------------------------------------------


@pydantic.dataclasses.dataclass
class StopwordsOptions:
    prompts: Literal["corpus", "lambada"] = option(
        "corpus",
        "sentences of --text with the last word held out, or LAMBADA (needs the hub or a "
        "datasets cache)",
    )
    n_prompts: PositiveInt = option(100, "prompts to average over")
    case_study: Text = option(CASE_STUDY_PROMPT, "prompt for the top-5 table")


def stopwords_study(experiment: Experiment, options: StopwordsOptions) -> documents.Stopwords:
    setup, coords = experiment.setup, experiment.coords
    if options.prompts == "lambada":
        pairs, prompt_source = lambada(options.n_prompts), "LAMBADA (OpenAI) test"
    else:
        pairs = last_word_contexts(sentences(setup.corpus.text, options.n_prompts))
        prompt_source = f"{setup.corpus.name} sentences, last word held out"
    contexts = prompt_tokens(setup.loaded, [c for c, _ in pairs], setup.prompt_bos)
    classes = token_classes(setup.loaded.tokenizer, setup.d_vocab)
    model = rule_model(setup.model)
    mass = class_mass(model, contexts, classes, coords)
    case = prompt_tokens(setup.loaded, [options.case_study], setup.prompt_bos)[:1]
    before, after = (model.next_token_logits(case, ablation)[0] for ablation in ([], coords))
    return typed(
        experiment.document("stopwords")
        | {
            "stopword_list": STOPWORD_SOURCE,
            "prompt_source": prompt_source,
            "n_prompts": len(pairs),
            "classes": mass.summary(),
            "class_sizes": {
                name: int((classes == i).sum()) for i, name in enumerate(mass.summary())
            },
            "case_study": {
                "prompt": options.case_study,
                "before": top_tokens(setup.loaded.tokenizer, before, 5),
                "after": top_tokens(setup.loaded.tokenizer, after, 5),
            },
        }
    )


# --- quantize -------------------------------------------------------------------------------


def _block(value: Any) -> Any:
    return None if value == "tensor" else value


Block = Annotated[PositiveInt | None, BeforeValidator(_block)]


@pydantic.dataclasses.dataclass
class QuantizeOptions:
    bits: list[PositiveInt] = option([8, 4, 3], "bit widths", cli="nargs")
    blocks: list[Block] = option(
        [None, 65536, 16384, 128],
        "block sizes in elements of the stored weight; 'tensor' (None) for one block",
        cli="nargs",
    )
    clip: Literal[CLIPS] = option("zscore", "outlier clipping")
    clip_value: Finite = option(
        6.0, "z-score (zscore) or percentile of |w| (percentile) to clip at"
    )
    all_linear: bool = option(False, "quantize every decoder linear layer")

    def schemes(self) -> list[Scheme]:
        return [
            Scheme(bits, block, method, self.clip, self.clip_value)
            for bits in self.bits
            for block in self.blocks
            for method in METHODS
        ]


def quantize_study(experiment: Experiment, options: QuantizeOptions) -> documents.Quantize:
    """Every scheme of the grid, each written in place and restored bit-for-bit (or, when
    the model is streamed, applied to each tensor as its layer is read)."""
    schemes = options.schemes()  # a bad grid is refused before the baseline's minutes
    setup = experiment.setup
    measure = partial(
        quantized_perplexity, setup.model, setup.tokens, setup.protocol, setup.corpus.name
    )
    baseline, _ = measure(None)
    rows = []
    for scheme in bar(schemes, desc="quantize", unit="setting"):
        result, n_parameters = measure(scheme, experiment.coords, options.all_linear)
        rows.append(
            {
                "bits": scheme.bits,
                "block": "tensor" if scheme.block_size is None else scheme.block_size,
                "method": scheme.method,
                "description": scheme.describe(),
                "n_parameters": n_parameters,
                **result.to_dict(),
                "ratio": result.perplexity / baseline.perplexity,
            }
        )
    return typed(
        experiment.document("quantize")
        | {
            "clip": {"method": options.clip, "value": options.clip_value},
            "all_linear": options.all_linear,
            "baseline": baseline.to_dict(),
            "quantized": rows,
        }
    )


# --- explain and robustness: the rule on single texts, no corpus ------------------------------

EXPLAIN = ("model", "prompt", *LOADING, *RULE)  # the options that explain takes


def explain_study(config: LocateConfig) -> documents.Explain:
    """Each spike the rule finds on the prompts, decomposed into its per-weight products."""
    loaded = load_configured_model(config)
    texts = prompt_tokens(loaded, config.prompts, loaded.adds_bos)
    found = locate(loaded.bridge, texts, loaded.adds_bos, config.criterion, config.iterations)
    decompositions = [
        decompose(loaded.bridge, texts[c.mlp_out.text], c.coord.layer, c.coord.row, c.mlp_out.pos)
        for c in found.candidates
    ]
    return typed(
        header("explain", loaded, config.seed)
        | {
            "prompts": config.prompts,
            "decompositions": [asdict(d) for d in decompositions],
        }
    )


@pydantic.dataclasses.dataclass
class RobustnessOptions:
    n_texts: PositiveInt = option(100, "sentences of --text, each scanned alone")


ROBUSTNESS = ("model", "text", "prompt", "prompt_bos", "weight", *LOADING, *RULE)


def robustness_study(config: LocateConfig, options: RobustnessOptions) -> documents.Robustness:
    """The rule on each text alone (the prompts, then sentences of the corpus)."""
    loaded = load_configured_model(config)
    prepend_bos = resolve_bos(config.prompt_bos, loaded)
    texts = config.prompts + sentences(load_corpus(config.text).text, options.n_texts)
    ids = prompt_tokens(loaded, texts, prepend_bos)
    report = robustness(loaded.bridge, ids, prepend_bos, config.criterion, config.weights)
    return typed(
        header("robustness", loaded, config.seed)
        | {
            "texts": texts,
            "n_texts": len(texts),
            "prepend_bos": prepend_bos,
            "criterion": config.criterion.to_dict(),
            "weights": [asdict(r) for r in report],
        }
    )


# --- circuit --------------------------------------------------------------------------------


@pydantic.dataclasses.dataclass
class CircuitOptions:
    circuit_tokens: PositiveInt = option(
        1024, "corpus tokens (from the start of --text) for the corpus sink map and patching"
    )
    fraction: Fraction = option(
        0.1, "super-activation tokens: where |activation| >= this x its largest"
    )
    heads_shown: PositiveInt = option(4, "heads on the attention page: the most changed sinks")
    exact_top: NonNegativeInt = option(
        0, "patch exactly only attribution's top N components (0: every component)"
    )
    top_k: PositiveInt = option(10, "k of the attribution-vs-exact top-k overlap")


def circuit_study(experiment: Experiment, options: CircuitOptions) -> documents.Circuit:
    """`sw_lens.circuit` on the prompts and the first ``circuit_tokens`` of the corpus,
    cut as the perplexity protocol cuts it."""
    setup = experiment.setup
    protocol = replace(setup.protocol, max_tokens=options.circuit_tokens)
    cut = windows(setup.tokens, protocol, setup.model.tokenizer.bos_token_id)
    result = circuit(
        setup.model,
        experiment.coords,
        list(setup.texts),
        cut,
        protocol,
        fraction=options.fraction,
        heads_shown=options.heads_shown,
        exact_top=options.exact_top,
        top_k=options.top_k,
    )
    return typed(
        experiment.document("circuit")
        | {
            "options": asdict(options),
            "prompts": experiment.config.prompts,
            "corpus": setup.corpus.name,
            **circuit_dict(result),
        }
    )
