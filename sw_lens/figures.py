"""Paper figures and the token-loss page, drawn from a results document only.

Nothing here loads a model: figures read the saved JSON, so they can be restyled and
regenerated in seconds (``experiments/figures.py RESULTS.json``). Every figure is written
as PDF and as PNG at 300 dpi, sized for one column of a two-column paper (3.4 in), with
TransformerLens hook names on its axes and the model and prompt in a caption line and in
the file's metadata.
"""

import functools
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from sw_lens import pages  # noqa: E402
from sw_lens.documents import (  # noqa: E402
    Circuit,
    Controls,
    Experiment,
    Explain,
    Locate,
    PerplexityResult,
    Quantize,
    Restore,
    Robustness,
    Scaling,
    Stopwords,
    Track,
)
from sw_lens.errors import SwLensError  # noqa: E402
from sw_lens.results import write_atomic  # noqa: E402
from sw_lens.vocabulary import hook_down_out, hook_post  # noqa: E402

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
DPI = 300
STYLE = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.0,
    "pdf.fonttype": 42,  # editable text in the PDF, as journals ask
}
BLUE, RED, GREY = "#1f77b4", "#d62728", "#7f7f7f"
HEATMAP_TOKENS = 96  # rows of the spike heatmap: a figure must fit a page


def caption(document: Locate) -> str:
    prompts = "; ".join(document.scan.prompts)
    bos = "BOS prepended" if document.scan.prepend_bos else "no BOS"
    return f"{document.model.name}, prompt {prompts!r} ({bos})"


def _prompts(document: Explain | Track) -> str:
    """The scanned prompts of a track or explain document (one `prompt` before the
    options became one schema)."""
    prompts = document.prompts or [document.prompt or ""]
    return "prompt " + "; ".join(map(repr, prompts))


def _save(fig, out_dir: Path, stem: str, text: str, title: str) -> list[Path]:
    """PDF and PNG with the caption `text` in the figure and in the files' metadata."""
    fig.supxlabel(text, fontsize=5, color=GREY)
    paths = []
    for fmt, meta in (
        # No CreationDate: the same results give byte-identical figures.
        ("pdf", {"Title": title, "Subject": text, "Creator": "sw_lens", "CreationDate": None}),
        ("png", {"Title": title, "Description": text, "Software": "sw_lens"}),
    ):
        path = Path(out_dir) / f"{stem}.{fmt}"
        write_atomic(
            path, lambda tmp, f=fmt, m=meta: fig.savefig(tmp, format=f, dpi=DPI, metadata=m)
        )
        paths.append(path)
    plt.close(fig)
    return paths


def _literal(value):
    """A document's strings drawn as they are: a "$" in a token, label or name is a
    dollar sign, never the start of mathtext (which a hostile token could make fail to
    parse). Matplotlib's own log-axis labels still use mathtext."""
    if isinstance(value, BaseModel):
        return type(value).model_validate(_literal(value.model_dump()))
    if isinstance(value, str):
        return value.replace("$", r"\$")
    if isinstance(value, dict):
        return {_literal(k): _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _drawn(draw: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
    """A figure drawn from a results file (its strings `_literal`), which may hold what
    matplotlib cannot lay out (a perplexity of 1e308, ten thousand bars): one line naming
    the figure, not a traceback. The schema (`sw_lens.documents`) has already refused
    wrong types."""

    @functools.wraps(draw)
    def checked(document, *args, **kwargs) -> list[Path]:
        try:
            return draw(_literal(document), *args, **kwargs)
        except (ValueError, OverflowError, FloatingPointError) as err:
            plt.close("all")
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SwLensError(f"cannot draw {draw.__name__} from this document: {reason}") from None

    return checked


def _figure(height: float, ncols: int = 1):
    return plt.subplots(1, ncols, figsize=(COLUMN_WIDTH, height), layout="constrained")


HOOKS = {
    "post": ("down_proj_input_max", hook_post("l"), "down-projection input"),
    "mlp_out": ("down_proj_output_max", hook_down_out("l"), "down-projection output"),
}


@_drawn
def layer_maxima(document: Locate, out_dir: Path, log_scale: bool = True) -> list[Path]:
    """Per layer, the largest |down-projection input| and |output| on the scanned prompt
    (the original project's two plots), with the layers of the weights found marked and
    their largest value's channel and token annotated."""
    layers = document.scan.layers
    marks = {c.layer for c in document.super_weights or document.candidates}
    paths = []
    for key, (stem, hook, what) in HOOKS.items():
        fig, ax = _figure(2.2)
        xs = [s.layer for s in layers]
        ax.plot(
            xs, [abs(getattr(s, key).value) for s in layers], marker="o", markersize=2, color=BLUE
        )
        for layer in sorted(marks):
            spike = getattr(
                layers[layer], key
            )  # the layer's largest value, where a weight was found
            ax.plot(layer, abs(spike.value), "o", color=RED, markersize=4)
            ax.annotate(
                f"layer {layer}, ch {spike.channel}\n{spike.token!r}",
                (layer, abs(spike.value)),
                xytext=(4, -2),
                textcoords="offset points",
                fontsize=5,
                va="top",
            )
        ax.set_yscale("log" if log_scale else "linear")
        ax.set_xlabel("layer l")
        ax.set_ylabel(f"max |{hook}|")
        ax.set_title(f"max |{what}| per layer (activation units)")
        paths += _save(fig, out_dir, stem, caption(document), f"max |{what}| per layer")
    return paths


@_drawn
def spike_heatmap(document: Locate, out_dir: Path) -> list[Path]:
    """Tokens x top channels of the first spike layer: the super activation sits on one
    channel at a few tokens. Symmetric-log colours so 1e4 and 1 are both visible."""
    if not document.layer_activations:
        return []
    acts = document.layer_activations[0]
    layer, tokens = acts.layer, acts.tokens[:HEATMAP_TOKENS]  # a long prompt: its start
    fig, axes = _figure(0.9 + 0.12 * len(tokens), ncols=2)
    for ax, key, hook in (
        (axes[0], "post", hook_post(layer)),
        (axes[1], "mlp_out", hook_down_out(layer)),
    ):
        values = np.array(getattr(acts, key)[: len(tokens)])
        limit = float(np.abs(values).max()) or 1.0
        image = ax.imshow(
            values,
            aspect="auto",
            cmap="RdBu_r",
            norm=SymLogNorm(linthresh=1.0, vmin=-limit, vmax=limit),
            interpolation="nearest",
        )
        channels = getattr(acts, f"{key}_channels")
        ax.set_xticks(range(len(channels)), [str(c) for c in channels], rotation=90, fontsize=4)
        ax.set_yticks(range(len(tokens)), [repr(t)[:24] for t in tokens], fontsize=5)
        ax.set_xlabel("channel (top by max |value|)")
        ax.set_title(hook, fontsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=4)
    return _save(fig, out_dir, "spike_heatmap", caption(document), f"layer {layer} activations")


def _perplexity_axis(ax, base: PerplexityResult, values: list[float]) -> None:
    """A log perplexity axis labelled with the corpus, token count and protocol."""
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.5, max(values) * 3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"perplexity ({base.corpus}, {base.n_tokens} tokens)")
    ax.set_title("\n".join(textwrap.wrap(base.protocol_description, 50)), fontsize=5)


def _perplexity_bars(rows: list[tuple[str, float, str]], base: PerplexityResult, errors=None):
    """Horizontal bars (label, perplexity, colour), top to bottom; `errors` are
    (low, high) distances for an error bar per row, or None."""
    fig, ax = _figure(0.8 + 0.28 * len(rows))
    values = [v for _, v, _ in rows]
    bars = ax.barh(range(len(rows)), values, color=[c for *_, c in rows], height=0.6, xerr=errors)
    labels = [f"{v:.2f}" if v < 1e4 else f"{v:.3g}" for v in values]
    ax.bar_label(bars, labels, padding=2, fontsize=5)
    ax.set_yticks(range(len(rows)), [_short(label) for label, *_ in rows])
    ax.invert_yaxis()
    _perplexity_axis(ax, base, values)
    return fig, ax


@_drawn
def perplexity_bars(document: Locate, out_dir: Path) -> list[Path]:
    """Baseline against each ablation."""
    ppl = document.perplexity
    rows = [("baseline", ppl.baseline.perplexity, GREY)]
    rows += [(a.label, a.perplexity, RED) for a in ppl.ablations]
    fig, _ = _perplexity_bars(rows, ppl.baseline)
    return _save(fig, out_dir, "perplexity", caption(document), "perplexity with weights zeroed")


def _short(label: str) -> str:
    """'layer 11 down_proj.weight[507, 1229]' -> 'L11 [507, 1229]' for a bar label."""
    return re.sub(r"layer (\d+) down_proj\.weight", r"L\1 ", label)


@_drawn
def weight_outlier(document: Locate, out_dir: Path) -> list[Path]:
    """The super weight against every weight of its matrix, with its z-score."""
    if not document.weight_distributions:
        return []
    dist = document.weight_distributions[0]
    fig, ax = _figure(2.0)
    edges, counts = np.array(dist.edges), np.array(dist.counts)
    ax.stairs(counts, edges, fill=True, color=BLUE, alpha=0.7)
    ax.axvline(dist.value, color=RED, linewidth=0.8)
    ax.annotate(
        f"down_proj.weight[{dist.row}, {dist.col}] = {dist.value:.3g}\n"
        f"z = {dist.z_score:.1f}, rank {dist.rank} of {dist.n_weights:,} by |w|",
        (dist.value, counts.max()),
        xytext=(-4, 0),
        textcoords="offset points",
        ha="right" if dist.value > 0 else "left",
        va="top",
        fontsize=5,
        color=RED,
    )
    ax.set_yscale("log")
    ax.set_xlabel(f"weight value, blocks.{dist.layer}.mlp.W_out")
    ax.set_ylabel("count")
    ax.set_title(
        f"layer {dist.layer} down-projection weights (mean {dist.mean:.2g}, std {dist.std:.2g})"
    )
    return _save(fig, out_dir, "weight_outlier", caption(document), "super weight among its matrix")


def token_loss_page(document: Locate, out_dir: Path) -> list[Path]:
    """An HTML page (works offline: circuitsvis's JavaScript is inlined) colouring each
    scored token by its loss increase when the weights are zeroed, and the top-k next-token
    predictions on the case-study prompt before and after. Every string is escaped for
    where it lands (`sw_lens.pages`): token text comes from the tokenizer file."""
    loss, pred = document.token_loss, document.predictions
    if loss is None:
        return []
    deltas = loss.delta
    limit = max(abs(d) for d in deltas) or 1.0
    tokens = pages.circuitsvis_element(
        "sw-lens-tokens",
        "ColoredTokens",
        loss.tokens,
        values=deltas,
        minValue=-limit,
        maxValue=limit,
        negativeColor="blue",
        positiveColor="red",
    )
    rows = "".join(
        f"<tr><td>{pages.text(repr(b.token))}</td><td>{b.prob:.3f}</td>"
        f"<td>{pages.text(repr(a.token))}</td><td>{a.prob:.3f}</td></tr>"
        for b, a in zip(pred.before, pred.after, strict=True)
    )
    base = document.perplexity.baseline
    mean = sum(deltas) / len(deltas)
    body = f"""<h1>{pages.text(document.model.name)}: {pages.text(loss.label)} zeroed</h1>
<p>Per-token loss increase (nats) on the first {len(deltas)} scored tokens of
{pages.text(base.corpus)} ({pages.text(base.protocol_description)});
red: the token became harder to predict. Mean increase {mean:.3f} nats.</p>
{tokens}
<h2>Next-token predictions for {pages.text(repr(pred.prompt))}</h2>
<table><tr><th>before</th><th>p</th><th>after</th><th>p</th></tr>{rows}</table>
{pages.json_data("sw-lens-token-loss", loss)}"""
    text = pages.page(f"sw_lens: {loss.label}", body)
    path = Path(out_dir) / "token_loss.html"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [path]


EFFECT_TICKS = (0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 30, 100, 1e3, 1e4, 1e5, 1e6)


@_drawn
def search_figure(document: Locate, out_dir: Path) -> list[Path]:
    """Every weight the search measured: its effect against its rank by largest
    contribution, marked by how it was found, with the criterion and the negligible line.
    Nothing in the figure when the document predates the search (``find="rule"``)."""
    search = document.search
    if not search:
        return []
    measured = search.measured
    marks = {  # the first source that applies
        "spike rule": ("s", RED),
        "saliency": ("^", "#2ca02c"),
        "contribution": ("o", BLUE),
        "walk": ("o", "#9ecae1"),
        "sample": ("x", GREY),
        "given": ("D", "#9467bd"),
    }
    fig, ax = _figure(2.4)
    for how, (marker, colour) in marks.items():
        group = [m for m in measured if next(h for h in marks if h in m.found_by) == how]
        if group:
            ax.scatter(
                [m.contribution_rank for m in group],
                [m.confirmed_effect or m.effect for m in group],
                marker=marker,
                color=colour,
                s=10,
                label=how,
            )
    ratio = document.criterion.min_ppl_ratio
    ax.axhline(ratio, color=RED, lw=0.6, ls="--", label=f"criterion x{ratio:g}")
    ax.axhline(search.parameters.negligible, color=GREY, lw=0.6, ls=":")
    ax.axvline(search.stop_rank, color=GREY, lw=0.6, ls="-.", label="walk's end")
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = max(m.confirmed_effect or m.effect for m in measured)
    ax.set_yticks([t for t in EFFECT_TICKS if t <= max(top, ratio) * 1.05] or [1])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"x{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("rank by largest contribution (1 = largest in the model)")
    ax.set_ylabel("perplexity ratio, zeroed alone")
    ax.legend(fontsize=5, ncols=2)
    text = f"{document.model.name}: {search.verdict}"
    return _save(fig, out_dir, "search", text, "threshold-free search")


FIGURES: list[Callable[[Locate, Path], list[Path]]] = [
    search_figure,
    spike_heatmap,
    perplexity_bars,
    weight_outlier,
    token_loss_page,
]


def render_all(document: Locate, out_dir: Path, log_scale: bool = True) -> list[Path]:
    """Every figure and the token-loss page of a locate results document."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        paths = layer_maxima(document, out_dir, log_scale)
        for draw in FIGURES:
            paths += draw(document, out_dir)
    return paths


@_drawn
def track_figure(document: Track, out_dir: Path) -> list[Path]:
    """Across training: the spike of every layer that ever meets the rule (or is the
    largest), and the value of each super weight where the rule finds it."""
    records = document.checkpoints
    steps = [r.iter_num if r.iter_num is not None else i for i, r in enumerate(records)]
    layers = sorted(
        {c.layer for r in records for c in r.candidates} | {r.spike.layer for r in records}
    )
    with plt.rc_context(STYLE):
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(COLUMN_WIDTH, 3.6), sharex=True, layout="constrained"
        )
        for layer in layers:
            top.plot(
                steps,
                [r.max_mlp_out[layer] for r in records],
                marker="o",
                markersize=2,
                label=f"layer {layer}",
            )
        top.set_yscale("log")
        top.set_ylabel("max |down_proj output|")
        top.legend(frameon=False, ncols=2)
        weights = sorted({(c.layer, c.row, c.col) for r in records for c in r.candidates})
        for layer, row, col in weights:
            points = [
                (step, c.value)
                for step, r in zip(steps, records, strict=True)
                for c in r.candidates
                if (c.layer, c.row, c.col) == (layer, row, col)
            ]
            xs, ys = zip(*points, strict=True)
            bottom.plot(xs, ys, marker="o", markersize=3, label=f"L{layer} [{row}, {col}]")
        bottom.axhline(0, color=GREY, linewidth=0.5)
        bottom.set_ylabel("super weight value")
        bottom.set_xlabel("training step (iter_num)")
        if weights:
            bottom.legend(frameon=False, ncols=2)
        text = f"{len(records)} checkpoints, {_prompts(document)}"
        return _save(fig, out_dir, "track", text, "super weights across training")


@_drawn
def decomposition_figure(document: Explain, out_dir: Path) -> list[Path]:
    """Cumulative share of each spike carried by its k largest weight products: a super
    weight is a curve that starts near 1."""
    if not document.decompositions:
        return []
    with plt.rc_context(STYLE):
        fig, ax = _figure(2.2)
        for d in document.decompositions:
            k = range(1, len(d.cumulative) + 1)
            ax.plot(
                k,
                d.cumulative,
                marker="o",
                markersize=2,
                label=f"L{d.layer} ch {d.row} ({d.verdict})",
            )
        ax.axhline(1.0, color=GREY, linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("k largest products hook_post[pos, col] * W_out[col, row], toward the output")
        ax.set_ylabel("share of down_proj output[pos, row]")
        ax.legend(frameon=False)
        text = f"{document.model.name}, {_prompts(document)}"
        return _save(fig, out_dir, "decomposition", text, "spike decomposition")


KIND_COLOURS = {"BOS": "#9467bd", "first token": "#ff7f0e", "delimiter": "#2ca02c", "other": BLUE}


@_drawn
def robustness_figure(document: Robustness, out_dir: Path, max_weights: int = 8) -> list[Path]:
    """Per weight, its super activation in every scanned text, coloured by the kind of
    token where it fires in the texts where the rule names it (grey: elsewhere)."""
    weights = document.weights[:max_weights]
    if not weights:
        return []
    with plt.rc_context(STYLE):
        fig, ax = _figure(0.8 + 0.3 * len(weights))
        for y, w in enumerate(weights):
            firings = w.firings
            jitter = np.linspace(-0.2, 0.2, len(firings))
            ax.scatter(
                [abs(f.value) for f in firings],
                y + jitter,
                s=3,
                c=[KIND_COLOURS[f.kind] if f.by_rule else GREY for f in firings],
                linewidths=0,
            )
        labels = [
            f"L{w.layer} [{w.row}, {w.col}]  {w.n_rule}/{w.n_texts}"
            + (" cancels" if "cancels the massive activation" in w.flags else "")
            for w in weights
        ]
        ax.set_yticks(range(len(weights)), labels)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("max |down_proj output[:, row]| per text")
        ax.set_title("super activation per text; label: texts where the rule names it")
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", markersize=3, color=colour, label=kind)
            for kind, colour in [*KIND_COLOURS.items(), ("not named", GREY)]
        ]
        ax.legend(handles=handles, frameon=False, fontsize=5, loc="best")
        bos = "BOS prepended" if document.prepend_bos else "no BOS"
        text = f"{document.model.name}, {document.n_texts} texts ({bos})"
        return _save(fig, out_dir, "robustness", text, "super weights across texts")


def experiment_caption(document: Experiment) -> str:
    weights = ", ".join(f"L{w.layer} [{w.row}, {w.col}]" for w in document.super_weights)
    return f"{document.model.name}, super weights {weights}"


CONTROL_COLOURS = {
    "super": RED,
    "largest": BLUE,
    "largest + super": "#9467bd",
    "random": GREY,
    "scaled": "#ff7f0e",
}


@_drawn
def controls_figure(document: Controls, out_dir: Path) -> list[Path]:
    """The super weights zeroed against the controls; random draws as their mean with
    the min-max range."""
    base = document.baseline
    rows = [("baseline", base.perplexity, GREY)]
    rows += [
        (r.label, r.perplexity, CONTROL_COLOURS[r.kind])
        for r in document.controls
        if r.kind != "random"
    ]
    errors = [(0.0, 0.0)] * len(rows)
    draws = document.summary
    if draws.draws:
        rows.insert(4, (f"(d) {draws.draws} random, matched |w|", draws.mean, GREY))
        errors.insert(4, (draws.mean - draws.min, draws.max - draws.mean))
    with plt.rc_context(STYLE):
        fig, _ = _perplexity_bars(rows, base, errors=np.array(errors).T)
        return _save(fig, out_dir, "controls", experiment_caption(document), "controls")


@_drawn
def restore_figure(document: Restore, out_dir: Path) -> list[Path]:
    """Baseline, super weights zeroed, and zeroed with the super activation restored."""
    base = document.baseline
    rows = [
        ("baseline", base.perplexity, GREY),
        ("super weights zeroed", document.zeroed.perplexity, RED),
        ("zeroed, super activation restored", document.restored.perplexity, BLUE),
    ]
    with plt.rc_context(STYLE):
        fig, ax = _perplexity_bars(rows, base)
        ax.set_title(
            f"{base.protocol_description}; recovered {document.recovered:.0%} of the "
            f"loss (mean NLL)",
            fontsize=5,
        )
        return _save(fig, out_dir, "restore", experiment_caption(document), "restore")


@_drawn
def stopwords_figure(document: Stopwords, out_dir: Path) -> list[Path]:
    """Mean next-token probability per token class before and after the ablation."""
    classes = document.classes
    names = list(classes)
    with plt.rc_context(STYLE):
        fig, ax = _figure(2.0)
        x = np.arange(len(names))
        for offset, key, colour in ((-0.18, "before", GREY), (0.18, "after", RED)):
            values = [getattr(classes[n], key) for n in names]
            bars = ax.bar(x + offset, values, width=0.36, color=colour, label=key)
            if key == "after":
                ratios = [classes[n].ratio for n in names]
                ax.bar_label(
                    bars, [f"x{r:.2f}" if r else "" for r in ratios], padding=1, fontsize=5
                )
        ax.set_xticks(x, names)
        ax.set_ylabel("mean next-token probability")
        ax.set_title(f"{document.n_prompts} prompts ({document.prompt_source})")
        ax.legend(frameon=False)
        return _save(fig, out_dir, "stopwords", experiment_caption(document), "stopwords")


@_drawn
def scaling_figure(document: Scaling, out_dir: Path) -> list[Path]:
    """Perplexity against the factor the super weights are multiplied by."""
    base = document.baseline
    points = document.scaling
    with plt.rc_context(STYLE):
        fig, ax = _figure(2.2)
        factors = [p.scale for p in points]
        ax.plot(factors, [p.perplexity for p in points], marker="o", markersize=2, color=RED)
        ax.axhline(base.perplexity, color=GREY, linewidth=0.6, linestyle="--")
        ax.annotate(
            f"baseline {base.perplexity:.2f}",
            (max(factors), base.perplexity),
            ha="right",
            va="bottom",
            fontsize=5,
            color=GREY,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("super weights multiplied by")
        ax.set_ylabel(f"perplexity ({base.corpus}, {base.n_tokens} tokens)", color=RED)
        if document.task:
            right = ax.twinx()
            right.plot(
                factors, [p.accuracy.share for p in points], marker="s", markersize=2, color=BLUE
            )
            right.set_ylabel(f"next-word accuracy ({document.task.n_prompts} prompts)", color=BLUE)
            right.spines["right"].set_visible(True)
        ax.set_title(base.protocol_description, fontsize=5)
        return _save(fig, out_dir, "scaling", experiment_caption(document), "scaling")


@_drawn
def quantize_figure(document: Quantize, out_dir: Path) -> list[Path]:
    """One panel per bit width: perplexity per block size for each method."""
    base = document.baseline
    rows = document.quantized
    ppl = {(r.bits, r.block, r.method): r.perplexity for r in rows}
    bits = sorted({r.bits for r in rows}, reverse=True)
    blocks = list(dict.fromkeys(r.block for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    colours = dict(zip(methods, [GREY, BLUE, RED], strict=False))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, len(bits), figsize=(COLUMN_WIDTH, 2.2), layout="constrained", sharey=True
        )
        for ax, b in zip(np.atleast_1d(axes), bits, strict=True):
            for method in methods:
                ax.plot(
                    range(len(blocks)),
                    [ppl[b, block, method] for block in blocks],
                    marker="o",
                    markersize=2,
                    label=method,
                    color=colours[method],
                )
            ax.axhline(base.perplexity, color=GREY, linewidth=0.6, linestyle="--")
            ax.set_xticks(range(len(blocks)), [str(block) for block in blocks], rotation=45)
            ax.set_title(f"{b}-bit RTN")
            ax.set_yscale("log")
            ax.set_xlabel("block size")
        np.atleast_1d(axes)[0].set_ylabel(f"perplexity ({base.corpus})")
        np.atleast_1d(axes)[0].legend(frameon=False, fontsize=5)
        return _save(fig, out_dir, "quantize", experiment_caption(document), "quantization")


@_drawn
def sweep_figure(rows: list[dict], out_dir: Path) -> list[Path]:
    """Across a sweep: each super weight's perplexity ratio, and how deep in its model it
    sits (layer / (n_layers - 1))."""
    found = [r for r in rows if r.get("ratio") is not None]
    if not found:
        return []
    labels = [f"{r['run']} L{r['layer']} [{r['row']}, {r['col']}]" for r in found]
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(
            1,
            2,
            figsize=(COLUMN_WIDTH * 2, 0.8 + 0.25 * len(found)),
            sharey=True,
            layout="constrained",
        )
        ys = range(len(found))
        left.barh(ys, [r["ratio"] for r in found], color=RED, height=0.6)
        left.axvline(1.0, color=GREY, linewidth=0.6)
        left.set_xscale("log")
        left.set_yticks(ys, labels)
        left.invert_yaxis()
        left.set_xlabel("perplexity ratio, super weight zeroed / baseline")
        depth = [r["layer"] / max(1, r["n_layers"] - 1) for r in found]
        right.scatter(depth, ys, color=BLUE, s=8)
        right.set_xlim(-0.05, 1.05)
        right.set_xlabel("super weight layer / (n_layers - 1)")
        text = f"{len(found)} super weights in {len({r['run'] for r in found})} runs"
        return _save(fig, out_dir, "report", text, "super weights across models")


def _component_grid(document: Circuit, key: str) -> np.ndarray:
    """Layers x (heads + the MLP column) of a component field; NaN where a component was
    not patched (below the earliest zeroed layer, or outside the exact top N)."""
    n_layers, n_heads = document.model.n_layers, len(document.sinks.corpus.clean[0])
    grid = np.full((n_layers, n_heads + 1), np.nan)
    for row in document.patching.components:
        if getattr(row, key) is not None:
            grid[row.layer, n_heads if row.head is None else row.head] = getattr(row, key)
    return grid


def _layer_heatmap(fig, ax, values: np.ndarray, title: str, label: str, mlp_column: bool = False):
    """Layers x heads (and an MLP column) in a diverging scale around 0; the MLP column's
    values can be ten times a head's, so with it the scale is symmetric-log (linear
    within +-0.05)."""
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    limit = limit or 1.0
    norm = SymLogNorm(0.05, linscale=0.5, vmin=-limit, vmax=limit) if mlp_column else None
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    image = ax.imshow(
        values,
        aspect="auto",
        cmap=cmap,
        norm=norm,
        vmin=None if norm else -limit,
        vmax=None if norm else limit,
        interpolation="nearest",
    )
    n_heads = values.shape[1] - mlp_column
    step = max(1, n_heads // 4)
    ticks = list(range(0, n_heads - mlp_column, step))  # none next to the MLP column
    labels = [str(h) for h in ticks]
    if mlp_column:
        ticks, labels = ticks + [n_heads], labels + ["MLP"]
        ax.axvline(n_heads - 0.5, color="black", linewidth=0.5)
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8, label=label).ax.tick_params(labelsize=4)


def circuit_caption(document: Circuit) -> str:
    weights = ", ".join(f"L{w.layer} [{w.row},{w.col}]" for w in document.super_weights)
    exact = document.patching.exact
    return textwrap.fill(
        f"{document.model.name}, super weights {weights} zeroed; corpus "
        f"{document.corpus}: {exact.n_tokens} tokens, {exact.protocol_description}",
        80,
    )


@_drawn
def circuit_figure(document: Circuit, out_dir: Path) -> list[Path]:
    """The circuit document's figures (sink maps, patching maps, residual story) and its
    attention page."""
    text = circuit_caption(document)
    paths = []
    with plt.rc_context(STYLE):
        fig, axes = _figure(3.2, ncols=2)
        for ax, where in zip(axes, ("prompt", "corpus"), strict=True):
            sinks = getattr(document.sinks, where)
            difference = np.array(sinks.clean) - np.array(sinks.zeroed)
            _layer_heatmap(
                fig,
                ax,
                difference,
                f"{where} ({sinks.n_queries} queries)",
                "attention on sink: clean - zeroed",
            )
        paths += _save(fig, out_dir, "circuit_sinks", text, "attention-sink map")

        fig, axes = _figure(3.2, ncols=2)
        for ax, key, title in (
            (axes[0], "recovered", "activation patching (exact)"),
            (axes[1], "estimated", "attribution patching"),
        ):
            _layer_heatmap(
                fig,
                ax,
                _component_grid(document, key),
                title,
                "share of the loss increase recovered",
                mlp_column=True,
            )
        paths += _save(fig, out_dir, "circuit_patching", text, "mediation by patching")

        story = document.residual
        layers = range(len(story.channel_clean))
        fig, axes = _figure(2.4, ncols=2)
        for ax, key, label in (
            (axes[0], "channel", f"resid_post[{story.row}] at {story.token!r}"),
            (axes[1], "norm", f"|resid_post| at {story.token!r}"),
        ):
            ax.plot(layers, getattr(story, f"{key}_clean"), color=BLUE, label="clean")
            ax.plot(layers, getattr(story, f"{key}_zeroed"), color=RED, label="zeroed")
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            for layer in story.cancelling_layers:
                ax.axvline(layer, color=GREY, linewidth=0.4, linestyle=":")
        axes[0].legend(frameon=False)
        paths += _save(fig, out_dir, "circuit_residual", text, "residual stream of the sink token")
    return paths + attention_page(document, out_dir)


def attention_page(document: Circuit, out_dir: Path) -> list[Path]:
    """The prompt's attention patterns of the heads whose sink mass changed most, with the
    super weights and zeroed (circuitsvis, JavaScript inlined: opens offline), and the
    logit lens of the super-activation token. Strings escaped where they land."""
    page, story = document.attention, document.residual
    names = [f"L{layer} H{head}" for layer, head in page.heads]
    corpus = document.sinks.corpus
    rows = "".join(
        f"<tr><td>{pages.text(name)}</td><td>{corpus.clean[layer][head]:.3f}</td>"
        f"<td>{corpus.zeroed[layer][head]:.3f}</td></tr>"
        for name, (layer, head) in zip(names, page.heads, strict=True)
    )
    lens = "".join(
        f"<tr><td>{layer}</td><td>{pages.text(repr(a))}</td><td>{pages.text(repr(b))}</td></tr>"
        for layer, (a, b) in enumerate(zip(story.lens_clean, story.lens_zeroed, strict=True))
    )
    elements = [
        (
            f"sw-lens-{when}",
            "AttentionHeads",
            page.tokens,
            {"attention": getattr(page, when), "attentionHeadNames": names, "maskUpperTri": True},
        )
        for when in ("clean", "zeroed")
    ]
    for when in ("clean", "zeroed"):  # where the first head looks, token by token
        received = np.array(getattr(page, when)[0]).mean(axis=0).tolist()
        props = {"values": received, "minValue": 0.0, "maxValue": max(received) or 1.0}
        elements.append((f"sw-lens-{when}-tokens", "ColoredTokens", page.tokens, props))
    name = pages.text(document.model.name)
    body = f"""<h1>{name}: attention with the super weights, and zeroed</h1>
<p>Heads whose mean attention on the super-activation tokens changed most when the super
weights are zeroed (corpus sample, {corpus.n_queries} queries):</p>
<table><tr><th>head</th><th>clean</th><th>zeroed</th></tr>{rows}</table>
<p>Tokens are coloured by the mean attention {pages.text(names[0])} puts on each (over all
queries).</p>
<h2>Clean</h2>
{pages.element_div("sw-lens-clean-tokens")}
{pages.element_div("sw-lens-clean")}
<h2>Super weights zeroed</h2>
{pages.element_div("sw-lens-zeroed-tokens")}
{pages.element_div("sw-lens-zeroed")}
<h2>Logit lens of {pages.text(repr(story.token))} (position {story.position})</h2>
<table><tr><th>layer</th><th>clean</th><th>zeroed</th></tr>{lens}</table>
{pages.circuitsvis_elements(elements)}
{pages.json_data("sw-lens-attention", page)}"""
    html = pages.page(f"sw_lens: attention, {document.model.name}", body)
    path = Path(out_dir) / "circuit_attention.html"
    write_atomic(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return [path]
