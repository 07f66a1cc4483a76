"""Is a super weight a property of the model, or of the one prompt that exposed it?

The paper finds super weights on a single prompt ("Apple Inc. is a worldwide tech
company."). A reviewer asks whether the same weight makes the largest spike on other
text, how large that spike is there, and on which tokens it fires: the massive
activations of Sun et al. (2024) sit on the first token and on delimiters ("." and
"\\n"), so a weight that only fires there says something different from one that fires
on content words.

`robustness` scans every text on its own and applies the locate rule per text (the
medians over layers are that text's own). For every weight the rule names on any text,
plus any given weight, it then records per text the largest |down-projection output| at the
weight's output channel ``row`` in its layer, and where that sits, and the weight's own
largest contribution to that row (|``hook_post[:, col]`` x ``W[row, col]``|: weights of
one row share the row's activation, not their contribution). Per weight it reports in
how many texts the rule names it, in how many of those it also makes the text's top
spike (the largest |down-projection output| over all layers), the median and max of its own
contribution and of its row's super activation over texts, whether the rule found it
creating or cancelling the massive activation, and the kinds of token it fires on where
the rule names it, with flags a reviewer should see (a weight that cancels is no super
weight however robust its spike).
"""

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median

from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.locate import Criterion, apply_rule
from sw_lens.patching import check_coords
from sw_lens.progress import bar
from sw_lens.scan import column_maxima, scan
from sw_lens.vocabulary import WeightCoord

TOKEN_KINDS = ("BOS", "first token", "delimiter", "other")


def token_kind(text: str, pos: int, prepend_bos: bool) -> str:
    """BOS, the first token after it (or the first token of a text without BOS), a
    delimiter (whitespace and punctuation only, e.g. "." or "\\n"), or any other token."""
    if prepend_bos and pos == 0:
        return "BOS"
    if pos == int(prepend_bos):
        return "first token"
    stripped = text.strip()
    if all(unicodedata.category(ch).startswith("P") for ch in stripped):
        return "delimiter"  # also the empty string: a whitespace token
    return "other"


@dataclass
class Firing:
    """A weight's output channel at its largest |value| over one text."""

    text: int
    value: float  # the down-projection output [pos, row] of the weight's layer, signed
    pos: int
    token: str
    kind: str  # one of TOKEN_KINDS
    post: float  # hook_post[pos, col] at the same token: the super weight's input
    contribution: float  # the weight's largest |hook_post[:, col] * W[row, col]|, signed
    role: str | None  # "creates" or "cancels" where the rule names the weight, else None
    is_top: bool  # named by the rule and the text's largest |down-proj output| over layers
    by_rule: bool  # the locate rule names this weight on this text alone


@dataclass
class WeightRobustness:
    layer: int
    row: int
    col: int
    n_texts: int
    n_rule: int  # texts where the rule (criterion) names the weight
    n_top: int  # of those, texts where it makes the largest spike over all layers
    median_activation: float  # median over texts of max |down-proj output[:, row]| (the row's)
    max_activation: float
    median_contribution: float  # median over texts of the weight's own max |contribution|
    max_contribution: float
    roles: dict[str, int]  # "creates" / "cancels": texts where the rule found it so
    kinds: dict[str, int]  # token kinds it fires on, over the texts where the rule names it
    flags: list[str]
    firings: list[Firing] = field(repr=False)


def _flags(n_texts: int, n_rule: int, kinds: Counter, roles: Counter) -> list[str]:
    flags = ["cancels the massive activation"] if roles["cancels"] > roles["creates"] else []
    if n_texts > 1 and n_rule <= 1:
        flags.append("found on one prompt only" if n_rule else "never named by the rule")
    for kind in TOKEN_KINDS[:3]:
        if n_rule and kinds[kind] == n_rule:
            flags.append(f"{kind.replace(' ', '-')}-bound")
    return flags


def robustness(
    model: TransformerBridge,
    texts: Sequence[Int[Tensor, "pos"]],
    prepend_bos: bool,
    criterion: Criterion = Criterion(),
    weights: Sequence[WeightCoord] = (),
) -> list[WeightRobustness]:
    """Per weight (every weight the rule names on some text, and every one in `weights`),
    how it behaves across `texts`; sorted by the number of texts where the rule names it."""
    check_coords(model, weights)
    top: list[WeightCoord | None] = []
    named: list[dict[WeightCoord, str]] = []  # per text: weight -> role
    for ids in bar(texts, desc="scan texts", unit="text"):
        result = scan(model, [ids], prepend_bos)
        s = max(result.layers, key=lambda s: s.mlp_out.magnitude)
        paired = s.post.pos == s.mlp_out.pos
        top.append(WeightCoord(s.layer, s.mlp_out.channel, s.post.channel) if paired else None)
        found, _ = apply_rule(model, result, criterion, iteration=1, taken_neurons=set())
        named.append({c.coord: c.role for c in found})
    coords = sorted(set().union(*named) | set(weights))
    firings: dict[WeightCoord, list[Firing]] = {c: [] for c in coords}
    for text, ids in enumerate(bar(texts, desc="measure", unit="text")):
        for c, seen in column_maxima(model, ids, coords).items():
            token = model.tokenizer.decode([int(ids[seen.pos])])
            firings[c].append(
                Firing(
                    text=text,
                    value=seen.value,
                    pos=seen.pos,
                    token=token,
                    kind=token_kind(token, seen.pos, prepend_bos),
                    post=seen.post,
                    contribution=seen.contribution,
                    role=named[text].get(c),
                    is_top=c == top[text] and c in named[text],
                    by_rule=c in named[text],
                )
            )
    report = [_summarise(c, fs) for c, fs in firings.items()]
    return sorted(report, key=lambda r: (-r.n_rule, -r.n_top, r.layer, r.row, r.col))


def _summarise(c: WeightCoord, firings: list[Firing]) -> WeightRobustness:
    magnitudes = [abs(f.value) for f in firings]
    contributions = [abs(f.contribution) for f in firings]
    kinds = Counter(f.kind for f in firings if f.by_rule)
    roles = Counter(f.role for f in firings if f.role)
    n_top = sum(f.is_top for f in firings)
    n_rule = sum(f.by_rule for f in firings)
    return WeightRobustness(
        layer=c.layer,
        row=c.row,
        col=c.col,
        n_texts=len(firings),
        n_rule=n_rule,
        n_top=n_top,
        median_activation=median(magnitudes),
        max_activation=max(magnitudes),
        median_contribution=median(contributions),
        max_contribution=max(contributions),
        roles={role: roles[role] for role in ("creates", "cancels")},
        kinds={kind: kinds[kind] for kind in TOKEN_KINDS},
        flags=_flags(len(firings), n_rule, kinds, roles),
        firings=firings,
    )
