"""What a results document must hold before anything reads it: one typed schema per kind.

A results file is untrusted input: figures, the sweep report and the experiments'
``--results`` read files that anyone may have edited. Each kind has a pydantic model of
the fields its readers use, with the invariants the readers rely on (finite numbers,
a layer index inside the model, lists of matching length, a complete quantization
grid); `validate` turns the first violation into one line that names the field. Fields
not listed here are kept as they are (``extra="allow"``).

Strict mode: a number written as a string, a bool for an integer or NaN/inf are refused,
as a JSON document written by sw_lens never has them.

The types are the documents: a study returns one (`typed`), `Header.to_json` writes it,
`Header.from_json` (and `sw_lens.results.read_json`) read it back, and figures, the sweep
report and the commands' summaries read fields as attributes, so a field they use is a
field declared here. The schemas live in this one module rather than beside each study so
that redrawing figures or reading a sweep imports pydantic, not torch and the models.
"""

import json
from dataclasses import dataclass
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from sw_lens.errors import SwLensError

Index = Annotated[int, Field(ge=0)]
BARS = 200  # rows of a bar chart: one per ablation or control; a file cannot ask for more
Count = Annotated[int, Field(ge=1)]
Perplexity = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --- shared pieces -----------------------------------------------------------------------


class ModelInfo(Strict):
    name: str
    architecture: str
    n_layers: Count
    d_model: Count
    d_mlp: Count
    device_map: dict[str, str] | None = None  # module -> device, where one placed it


class PerplexityResult(Strict):
    corpus: str
    protocol_description: str
    n_tokens: Count
    nll: float
    perplexity: Perplexity


class Coord(Strict):
    layer: Index
    row: Index
    col: Index

    def key(self) -> tuple[int, int, int]:
        return self.layer, self.row, self.col


class Weight(Coord):
    value: float


class Criterion(Strict):
    min_ppl_ratio: float
    description: str


class Provenance(Strict):
    created: str
    git_commit: str | None
    versions: dict[str, str]
    device: str
    dtype: str
    seed: int


SCHEMA_VERSION = 2  # 2: next-word accuracy as counts; a track names its model


class Header(Strict):
    """What every results document starts with."""

    schema_version: Literal[2]
    kind: str
    provenance: Provenance

    @classmethod
    def from_json(cls, text: str, what: str = "results document") -> Self:
        """A document of this kind from JSON text, or a one-line error naming `what`."""
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise SwLensError(f"{what} is not valid JSON: {err}") from None
        (kind,) = cls.model_fields["kind"].annotation.__args__
        return parse(document, what, {kind})

    def to_json(self) -> str:
        return (
            json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2, allow_nan=False)
            + "\n"
        )


class OnModel(Header):
    """A document about one model: every weight it names lies inside that model."""

    model: ModelInfo

    def coords(self) -> list[Coord]:
        return []

    @model_validator(mode="after")
    def _inside_the_model(self):
        m = self.model
        for c in self.coords():
            _check(
                c.layer < m.n_layers and c.row < m.d_model and c.col < m.d_mlp,
                f"a weight (layer {c.layer}, row {c.row}, col {c.col}) lies outside the model "
                f"({m.n_layers} layers, d_model {m.d_model}, d_mlp {m.d_mlp})",
            )
        return self


class Execution(Strict):
    """How the numbers were computed: the whole model in memory, or streamed."""

    streamed: bool
    why: str | None
    description: str


class Experiment(OnModel):
    """controls, restore, stopwords, scaling, quantize: the same head (`experiment_document`)."""

    super_weights: list[Weight]
    super_weight_source: str
    execution: Execution | None = None  # documents written before streaming have none

    def coords(self) -> list[Coord]:
        return self.super_weights


class Measured(Experiment):
    """An experiment that measures perplexity against the unablated model."""

    baseline: PerplexityResult


# --- locate ------------------------------------------------------------------------------


class Spike(Strict):
    value: float
    channel: Index
    token: str


class ScanLayer(Strict):
    layer: Index
    post: Spike
    mlp_out: Spike
    cancels: bool


class Scan(Strict):
    prompts: list[str]
    prepend_bos: bool
    n_tokens: Count
    layers: list[ScanLayer]


class Candidate(Weight):
    checkpoint_param: str  # where the weight is in the loaded file's own layout
    checkpoint_index: Annotated[list[Index], Field(min_length=2, max_length=2)]
    iteration: Count | None  # None: a super weight the rule did not name
    role: Literal["creates", "cancels"] | None
    token: str
    output_activation: Spike
    effect: Annotated[float, Field(gt=0)] | None
    is_super: bool | None


class Ablation(Strict):
    label: str
    weights: list[Coord]
    perplexity: Perplexity
    ratio: Annotated[float, Field(gt=0)]


class LocatePerplexity(Strict):
    baseline: PerplexityResult
    ablations: Annotated[list[Ablation], Field(max_length=BARS)]


class LayerActivations(Strict):
    layer: Index
    tokens: list[str]
    post: list[list[float]]
    mlp_out: list[list[float]]
    post_channels: list[Index]
    mlp_out_channels: list[Index]

    @model_validator(mode="after")
    def _shapes(self):
        for key in ("post", "mlp_out"):
            rows, channels = getattr(self, key), getattr(self, f"{key}_channels")
            _check(
                len(rows) == len(self.tokens) and all(len(r) == len(channels) for r in rows),
                f"{key} is not tokens x {key}_channels ({len(self.tokens)} x {len(channels)})",
            )
        return self


class WeightDistribution(Weight):
    edges: list[float]
    counts: list[Annotated[float, Field(ge=0)]]
    z_score: float
    rank: Count
    n_weights: Count
    mean: float
    std: float

    @model_validator(mode="after")
    def _bins(self):
        _check(len(self.counts) >= 1, "counts is empty")
        _check(len(self.edges) == len(self.counts) + 1, "edges must be one longer than counts")
        return self


class TokenLoss(Strict):
    label: str
    tokens: list[str]
    delta: list[float]
    baseline_nll: list[float]
    ablated_nll: list[float]

    @model_validator(mode="after")
    def _pairs(self):
        _check(len(self.tokens) >= 1, "no tokens")
        for key in ("delta", "baseline_nll", "ablated_nll"):
            _check(
                len(getattr(self, key)) == len(self.tokens), f"{key} and tokens differ in length"
            )
        return self


class Prediction(Strict):
    token: str
    prob: Share


class Predictions(Strict):
    prompt: str
    label: str
    before: list[Prediction]
    after: list[Prediction]

    @model_validator(mode="after")
    def _pairs(self):
        _check(len(self.before) == len(self.after), "before and after differ in length")
        return self


class MeasuredWeight(Coord):
    found_by: Annotated[list[str], Field(min_length=1)]
    contribution_rank: Count
    saliency_rank: Count | None
    effect: Annotated[float, Field(gt=0)]
    confirmed_effect: Annotated[float, Field(gt=0)] | None
    is_super: bool


class SearchParameters(Strict):
    negligible: float
    search_k: Count
    recall_sample: Index


class Missed(Coord):
    found_by: list[str]


class Recall(Strict):
    found: Index
    of: Index


class Search(Strict):
    parameters: SearchParameters
    verdict: str
    n_measured: Count
    ranking: PerplexityResult
    stop_rank: Count
    stop_reason: str
    screen_overlap: Index
    sample_max: float | None
    ranking_noise: float | None
    warnings: list[str]
    missed_by_screens: list[Missed]
    rule_recall: Recall
    measured: Annotated[list[MeasuredWeight], Field(min_length=1)]

    def coords(self) -> list[Coord]:
        return [*self.measured, *self.missed_by_screens]


class KnownCheck(Strict):
    message: str


class Known(Strict):
    """The comparison with the registry of published coordinates."""

    entry: str | None
    convention: str
    checks: list[KnownCheck]


class Locate(OnModel):
    kind: Literal["locate"]
    execution: Execution | None = None  # documents written before streaming have none
    criterion: Criterion
    search: Search | None = None  # documents written before the search have none
    scan: Scan
    iterations: Count
    termination: str
    notes: list[str]
    ranking: PerplexityResult
    candidates: list[Candidate]
    super_weights: list[Candidate]
    super_weight_source: str
    known: Known | None
    perplexity: LocatePerplexity
    layer_activations: list[LayerActivations]
    weight_distributions: list[WeightDistribution]
    token_loss: TokenLoss | None
    predictions: Predictions | None

    def coords(self) -> list[Coord]:
        ablated = [w for a in self.perplexity.ablations for w in a.weights]
        searched = self.search.coords() if self.search else []
        return [
            *self.candidates,
            *self.super_weights,
            *ablated,
            *self.weight_distributions,
            *searched,
        ]

    @model_validator(mode="after")
    def _consistent(self):
        m = self.model
        _check(
            [s.layer for s in self.scan.layers] == list(range(m.n_layers)),
            f"scan.layers must list layers 0..{m.n_layers - 1} in order",
        )
        for s in self.scan.layers:
            _check(s.post.channel < m.d_mlp, f"layer {s.layer}: post channel >= d_mlp")
            _check(s.mlp_out.channel < m.d_model, f"layer {s.layer}: mlp_out channel >= d_model")
        for acts in self.layer_activations:
            _check(acts.layer < m.n_layers, f"layer_activations layer {acts.layer} >= n_layers")
        _check(
            (self.token_loss is None) == (self.predictions is None),
            "token_loss and predictions come together",
        )
        return self


# --- the experiments ---------------------------------------------------------------------


class ControlRow(Strict):
    label: str
    kind: Literal["super", "largest", "largest + super", "random", "scaled"]
    n_weights: Index
    perplexity: Perplexity
    ratio: Annotated[float, Field(gt=0)]


class DrawSummary(Strict):
    draws: Index
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    largest_share: Share
    largest_min_abs: float | None

    @model_validator(mode="after")
    def _stats(self):
        if self.draws:
            _check(None not in (self.mean, self.min, self.max), "draws without mean/min/max")
            _check(self.min <= self.mean <= self.max, "mean outside [min, max]")
        return self


class Controls(Measured):
    kind: Literal["controls"]
    controls: Annotated[list[ControlRow], Field(max_length=BARS)]
    summary: DrawSummary


class SuperActivation(Strict):
    layer: Index
    row: Index
    value: float
    threshold: float


class RestoredResult(PerplexityResult):
    n_restored: Index


class Restore(Measured):
    kind: Literal["restore"]
    fraction: float
    super_activations: list[SuperActivation]
    zeroed: PerplexityResult
    restored: RestoredResult
    recovered: float


class TokenClass(Strict):
    before: Share
    after: Share
    ratio: float | None


class CaseStudy(Strict):
    prompt: str
    before: list[Prediction]
    after: list[Prediction]


class Stopwords(Experiment):
    kind: Literal["stopwords"]
    stopword_list: str
    classes: dict[str, TokenClass]
    class_sizes: dict[str, Index]
    n_prompts: Index
    prompt_source: str
    case_study: CaseStudy

    @model_validator(mode="after")
    def _sizes(self):
        _check(self.class_sizes.keys() == self.classes.keys(), "class_sizes and classes differ")
        return self


class Accuracy(Strict):
    """Next-word accuracy as counted: the share alone hides how many prompts it rests on."""

    correct: Index
    n_prompts: Count
    share: Share

    @model_validator(mode="after")
    def _counted(self):
        _check(self.correct <= self.n_prompts, "more correct than prompts")
        _check(abs(self.share - self.correct / self.n_prompts) < 1e-9, "share != correct / n")
        return self


class ScalePoint(PerplexityResult):
    scale: float
    accuracy: Accuracy | None = None


class Task(Strict):
    description: str
    source: str
    n_prompts: Count


class Scaling(Measured):
    kind: Literal["scaling"]
    scaling: Annotated[list[ScalePoint], Field(min_length=1)]
    task: Task | None = None

    @model_validator(mode="after")
    def _accuracy(self):
        if self.task is not None:
            _check(
                all(
                    p.accuracy and p.accuracy.n_prompts == self.task.n_prompts for p in self.scaling
                ),
                "a point lacks accuracy on the task's prompts",
            )
        return self


class QuantizedRow(PerplexityResult):
    bits: Annotated[int, Field(ge=2, le=16)]
    block: Count | str | None
    method: str
    description: str
    n_parameters: Count
    ratio: Annotated[float, Field(gt=0)]


class Quantize(Measured):
    kind: Literal["quantize"]
    quantized: Annotated[list[QuantizedRow], Field(min_length=1)]

    @model_validator(mode="after")
    def _grid(self):
        rows = self.quantized
        methods = {r.method for r in rows}
        _check(len(methods) <= 3, f"at most 3 methods are drawn, got {len(methods)}")
        cells = {(r.bits, r.block, r.method) for r in rows}
        bits, blocks = {r.bits for r in rows}, {r.block for r in rows}
        _check(len(cells) == len(bits) * len(blocks) * len(methods), "the grid is incomplete")
        return self


def _pair(value):
    """A JSON pair, [a, b], as the tuple it was written from (strict mode takes lists
    for tuples only from JSON text)."""
    return tuple(value) if isinstance(value, list) else value


class Decomposition(Strict):
    layer: Index
    row: Index
    top: list[Annotated[tuple[Index, float], BeforeValidator(_pair)]]  # (col, product)
    verdict: str
    explanation: str
    cumulative: Annotated[list[float], Field(min_length=1)]  # can pass 1: products cancel


class Explain(OnModel):
    kind: Literal["explain"]
    prompts: list[str] | None = None
    prompt: str | None = None  # one prompt, before the options were one schema
    decompositions: list[Decomposition]


class Firing(Strict):
    value: float
    kind: Literal["BOS", "first token", "delimiter", "other"]
    by_rule: bool


class WeightRobustness(Coord):
    n_rule: Index
    n_top: Index
    n_texts: Index
    median_contribution: float
    max_contribution: float
    max_activation: float
    kinds: dict[str, Index]
    firings: list[Firing]
    flags: list[str]


class Robustness(OnModel):
    kind: Literal["robustness"]
    criterion: Criterion
    n_texts: Index
    prepend_bos: bool
    weights: list[WeightRobustness]

    def coords(self) -> list[Coord]:
        return self.weights


class TrackSpike(Strict):
    layer: Index
    magnitude: float
    post_channel: Index
    mlp_out_channel: Index
    token: str


class TrackWeight(Weight):
    role: str
    checkpoint_param: str


class TrackPerplexity(Strict):
    baseline: PerplexityResult
    ablated: PerplexityResult | None


class TrackCheckpoint(Strict):
    path: str
    iter_num: Index | None
    spike: TrackSpike
    max_post: list[float]
    max_mlp_out: list[float]
    candidates: list[TrackWeight]
    perplexity: TrackPerplexity | None


class Track(OnModel):
    """Checkpoints of one model in training: `model` is the first, every other the same
    shape (`sw_lens.track` refuses a series that is not)."""

    kind: Literal["track"]
    criterion: Criterion
    prompts: list[str] | None = None
    prompt: str | None = None  # one prompt, before the options were one schema
    checkpoints: Annotated[list[TrackCheckpoint], Field(min_length=1)]

    def coords(self) -> list[Coord]:
        return [c for r in self.checkpoints for c in r.candidates]

    @model_validator(mode="after")
    def _layers(self):
        n_layers = self.model.n_layers
        for r in self.checkpoints:
            _check(
                len(r.max_post) == len(r.max_mlp_out) == n_layers,
                f"a checkpoint without {n_layers} layers",
            )
            _check(r.spike.layer < n_layers, f"a spike in layer {r.spike.layer} of {n_layers}")
        return self


# --- circuit -----------------------------------------------------------------------------

Mass = Annotated[float, Field(ge=-1e-6, le=1 + 1e-6)]  # attention mass, float32 rounding
PAGE_TOKENS = 512  # the attention page's prompt: a file cannot make it larger


class SinkMap(Strict):
    n_queries: Count
    sink_positions: list[list[Index]]
    peak_positions: list[Index]
    clean: Annotated[list[list[Mass]], Field(min_length=1)]
    zeroed: list[list[Mass]]

    @model_validator(mode="after")
    def _shape(self):
        shape = [len(row) for row in self.clean]
        _check(shape == [len(row) for row in self.zeroed], "clean and zeroed differ in shape")
        _check(len(set(shape)) == 1 and shape[0] > 0, "rows of different numbers of heads")
        return self


class Sinks(Strict):
    prompt: SinkMap
    corpus: SinkMap


class PatchedLosses(Strict):
    protocol_description: str
    n_tokens: Count
    clean_nll: float
    zeroed_nll: float
    passes: Annotated[float, Field(ge=0)]


class ComponentRow(Strict):
    layer: Index
    head: Index | None
    name: str
    label: str
    estimated: float
    recovered: float | None
    reproduced: float | None


class Patching(Strict):
    attribution: PatchedLosses
    exact: PatchedLosses
    components: Annotated[list[ComponentRow], Field(min_length=1)]


class Agreement(Strict):
    n_components: Count
    spearman: Annotated[float, Field(ge=-1 - 1e-9, le=1 + 1e-9)] | None
    k: Count
    top_k_overlap: Index
    attribution_rank_of_exact_top: Count


class ResidualStory(Strict):
    position: Index
    token: str
    row: Index
    norm_clean: list[float]
    norm_zeroed: list[float]
    channel_clean: list[float]
    channel_zeroed: list[float]
    attn_writes: list[float]
    mlp_writes: list[float]
    lens_clean: list[str]
    lens_zeroed: list[str]
    peak_layer: Index
    present_layers: list[Index]
    cancelling_layers: list[Index]


class AttentionPage(Strict):
    tokens: Annotated[list[str], Field(min_length=1, max_length=PAGE_TOKENS)]
    heads: list[Annotated[list[Index], Field(min_length=2, max_length=2)]]  # [layer, head]
    clean: list[list[list[Mass]]]
    zeroed: list[list[list[Mass]]]

    @model_validator(mode="after")
    def _shape(self):
        n = len(self.tokens)
        for patterns in (self.clean, self.zeroed):
            _check(len(patterns) == len(self.heads), "one pattern per head shown")
            _check(
                all(len(p) == n and all(len(row) == n for row in p) for p in patterns),
                f"a pattern that is not {n} x {n} (the tokens shown)",
            )
        return self


class Circuit(Experiment):
    kind: Literal["circuit"]
    sinks: Sinks
    patching: Patching
    agreement: Agreement
    residual: ResidualStory
    attention: AttentionPage

    @model_validator(mode="after")
    def _inside(self):
        n_layers, story = self.model.n_layers, self.residual
        n_heads = len(self.sinks.corpus.clean[0])
        for sinks in (self.sinks.prompt, self.sinks.corpus):
            _check(len(sinks.clean) == n_layers, f"a sink map without {n_layers} layers")
            _check(len(sinks.clean[0]) == n_heads, "sink maps of different numbers of heads")
        per_layer = [
            getattr(story, f)
            for f in ResidualStory.model_fields
            if f.endswith(("_clean", "_zeroed", "_writes"))
        ]
        _check(
            all(len(v) == n_layers for v in per_layer),
            f"a residual story without {n_layers} layers",
        )
        _check(story.row < self.model.d_model, "the residual channel lies outside the model")
        heads = [(c.layer, c.head) for c in self.patching.components if c.head is not None]
        heads += self.attention.heads
        _check(
            all(c.layer < n_layers for c in self.patching.components)
            and all(layer < n_layers and head < n_heads for layer, head in heads),
            f"a component outside the model ({n_layers} layers, {n_heads} heads)",
        )
        return self


# --- sweep records -----------------------------------------------------------------------


class RunRecord(Strict):
    index: Index
    name: str
    experiments: list[str]
    options: dict
    args: dict[str, list[str]]

    @model_validator(mode="after")
    def _model(self):
        _check(isinstance(self.options.get("model"), str), "options.model must be a string")
        return self


class SweepPlan(Strict):
    sweep_file: str
    out: str
    slurm: dict
    runs: list[RunRecord]


class Step(Strict):
    experiment: str
    returncode: int
    error: str | None = None


class RunStatus(Strict):
    run: RunRecord
    status: Literal["ok", "failed"]
    steps: list[Step]

    @model_validator(mode="after")
    def _failed_step(self):
        if self.status == "failed":
            _check(any(s.returncode for s in self.steps), "failed, but no step failed")
        return self


@dataclass(frozen=True)
class Kind:
    """Everything the house knows of a kind of results document; registering a new
    experiment's kind is one entry here."""

    schema: type[Header]  # checked on every read (`results.read_json`)
    figure: str  # the `sw_lens.figures` function that draws it (named: figures imports this)
    swept: bool = False  # a command of one model that a sweep file may run


KINDS: dict[str, Kind] = {
    "locate": Kind(Locate, "render_all", swept=True),
    "controls": Kind(Controls, "controls_figure", swept=True),
    "restore": Kind(Restore, "restore_figure", swept=True),
    "stopwords": Kind(Stopwords, "stopwords_figure", swept=True),
    "scaling": Kind(Scaling, "scaling_figure", swept=True),
    "quantize": Kind(Quantize, "quantize_figure", swept=True),
    "explain": Kind(Explain, "decomposition_figure"),
    "robustness": Kind(Robustness, "robustness_figure"),
    "track": Kind(Track, "track_figure"),
    "circuit": Kind(Circuit, "circuit_figure", swept=True),
}


def _where(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def validate(document, schema: type[BaseModel], what: str) -> BaseModel:
    """`document` as `schema`, or its first problem as a one-line error."""
    try:
        return schema.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        where = _where(first["loc"])
        if first["type"] == "missing":
            raise SwLensError(f"{what} lacks the field '{where}'") from None
        reason = first["msg"].removeprefix("Value error, ")
        raise SwLensError(f"{what}: {where + ': ' if where else ''}{reason}") from None


def _from_schema_1(document: dict, what: str) -> dict:
    """A schema-1 document as schema 2: next-word accuracy, a bare share then, becomes
    counts (share x prompts was a whole number); a track then named no model."""
    if document.get("kind") == "track":
        raise SwLensError(
            f"{what} has schema_version 1, whose tracks name no model: regenerate it with "
            f"this version"
        )
    upgraded = document | {"schema_version": SCHEMA_VERSION}
    task, points = document.get("task"), document.get("scaling")
    n = task.get("n_prompts") if isinstance(task, dict) else None
    if isinstance(n, int) and n > 0 and isinstance(points, list):
        upgraded["scaling"] = [_counted(p, n) for p in points]
    return upgraded


def _counted(point, n: int):
    if isinstance(point, dict) and isinstance(point.get("accuracy"), float):
        correct = round(point["accuracy"] * n)
        return point | {"accuracy": {"correct": correct, "n_prompts": n, "share": correct / n}}
    return point


def parse(document, what: str, kinds: set[str]) -> Header:
    """A results document of one of `kinds`, of this schema version or upgraded from
    schema 1, as its type; anything else is a one-line error naming `what`."""
    found = document.get("schema_version") if isinstance(document, dict) else None
    if found == 1:
        document = _from_schema_1(document, what)
    elif found != SCHEMA_VERSION:
        raise SwLensError(
            f"{what} has schema_version {found!r}; this sw_lens reads {SCHEMA_VERSION} (and "
            f"upgrades 1): regenerate it with this version"
        )
    if document.get("kind") not in kinds:
        wanted = " or ".join(repr(k) for k in sorted(kinds))
        raise SwLensError(f"{what} holds {document.get('kind')!r}, not {wanted}")
    return validate(document, KINDS[document["kind"]].schema, what)
