"""Token-level perplexity under a stated protocol.

A perplexity without its protocol is not a result (lm-evaluation-harness): window
length, stride, BOS handling and the token budget all move the number, so `Protocol`
travels with every `PerplexityResult`, together with the count of scored tokens.

Windows follow the Hugging Face perplexity guide: with ``stride < window`` each window
re-reads ``window - stride`` tokens of context and scores only tokens no earlier window
scored; with the default ``stride = window`` windows do not overlap. Without a BOS token
the first token of a window has no context and is not scored.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import groupby

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from sw_lens import progress
from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.fast import Resume, forward_pass, twin_ablation
from sw_lens.patching import EditedColumns, Restore, column_edits
from sw_lens.vocabulary import WeightCoord

IGNORE = -100


@dataclass(frozen=True)
class Protocol:
    """How a perplexity is measured; saved next to every number it produced."""

    window: int = 512  # tokens per forward pass, BOS included
    stride: int | None = None  # corpus tokens between window starts; None: = window
    prepend_bos: bool = False  # each window starts with BOS, so its first token is scored
    max_tokens: int | None = None  # corpus tokens used, from the start; None: all
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.window < 2 + self.prepend_bos:
            raise SwLensError(f"window must be at least {2 + self.prepend_bos} tokens")
        if self.stride is not None and not 1 <= self.stride <= self.context:
            raise SwLensError(f"stride must be between 1 and {self.context} (window - BOS)")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise SwLensError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.batch_size <= 0:
            raise SwLensError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def context(self) -> int:
        """Corpus tokens per window."""
        return self.window - self.prepend_bos

    def describe(self) -> str:
        overlap = "non-overlapping" if self.stride is None else f"stride {self.stride}"
        bos = "BOS prepended" if self.prepend_bos else "no BOS"
        budget = "all tokens" if self.max_tokens is None else f"first {self.max_tokens} tokens"
        return f"token-level, window {self.window} ({overlap}), {bos}, {budget}"


@dataclass(frozen=True)
class Window:
    input_ids: Int[Tensor, "pos"]
    targets: Int[Tensor, "pos"]  # token predicted at each position, IGNORE if not scored
    positions: Int[Tensor, "n_scored"]  # corpus positions of the scored targets


def windows(
    tokens: Int[Tensor, "n_tokens"], protocol: Protocol, bos_token_id: int | None
) -> list[Window]:
    """Cut the corpus into the protocol's windows; every corpus token is scored at most once."""
    if protocol.prepend_bos and bos_token_id is None:
        raise SwLensError("the protocol prepends BOS but the tokenizer has no BOS token")
    if len(tokens) < protocol.context:
        raise SwLensError(
            f"the corpus has {len(tokens)} tokens, fewer than one window of "
            f"{protocol.context}: use a longer text or a smaller --window"
        )
    tokens = tokens[: protocol.max_tokens]
    n, context = len(tokens), protocol.context
    stride = protocol.stride or context
    offset = int(protocol.prepend_bos)  # index of the window's first corpus token
    result, scored_until = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(scored_until, begin + 1 - offset)
        if first < end:
            prefix = [bos_token_id] if protocol.prepend_bos else []
            input_ids = torch.cat([torch.tensor(prefix, dtype=torch.long), tokens[begin:end]])
            targets = torch.full_like(input_ids, IGNORE)
            # The logit at input index i predicts input index i + 1.
            targets[first - begin + offset - 1 : end - begin + offset - 1] = tokens[first:end]
            result.append(Window(input_ids, targets, torch.arange(first, end)))
        scored_until = end
        if end == n:
            break
    if not result:
        raise SwLensError(f"a budget of {n} tokens scores no token: raise --max-tokens")
    return result


@dataclass
class PerplexityResult:
    corpus: str
    protocol: Protocol
    n_tokens: int  # scored tokens
    nll: float  # mean negative log-likelihood per scored token, in nats
    token_nll: Float[Tensor, "n_tokens"]  # per scored token, for paired comparisons
    positions: Int[Tensor, "n_tokens"]  # corpus position of each scored token
    n_restored: int = 0  # (position, channel) entries kept unablated by `restore_above`

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll, dtype=torch.float64).exp())

    def to_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "protocol": asdict(self.protocol),
            "protocol_description": self.protocol.describe(),
            "n_tokens": self.n_tokens,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "n_restored": self.n_restored,
        }


def shared_tokens(tokens: Tensor, short: Protocol, long: Protocol) -> int:
    """How many corpus tokens make windows that `short` and `long` both cut, the same
    (0 when none: another window or BOS, a stride, or a last window cut short). A
    measurement under `long` can then reuse one under `short` and run only on
    ``tokens[shared:]`` (`extended`)."""
    shared = short.max_tokens or 0
    if (
        replace(short, max_tokens=long.max_tokens, batch_size=long.batch_size) != long
        or short.stride is not None
        or shared % short.context
        or min(len(tokens), long.max_tokens or len(tokens)) - shared < long.context
    ):
        return 0
    return shared


def rest_of(protocol: Protocol, shared: int) -> Protocol:
    """`protocol` for the corpus tokens after the first `shared`."""
    return replace(protocol, max_tokens=protocol.max_tokens and protocol.max_tokens - shared)


def extended(
    first: PerplexityResult, rest: PerplexityResult, shared: int, protocol: Protocol
) -> PerplexityResult:
    """`first`, measured on the first `shared` corpus tokens, and `rest`, measured on the
    tokens after them, as one result under `protocol`."""
    token_nll = torch.cat([first.token_nll, rest.token_nll])
    return PerplexityResult(
        corpus=first.corpus,
        protocol=protocol,
        n_tokens=len(token_nll),
        nll=float(token_nll.mean()),
        token_nll=token_nll,
        positions=torch.cat([first.positions, rest.positions + shared]),
    )


def check_window(n_ctx: int, protocol: Protocol) -> None:
    """Refuse a window longer than the model's context (`n_ctx` positions)."""
    if protocol.window > n_ctx:
        raise SwLensError(f"window {protocol.window} exceeds the model's context of {n_ctx} tokens")


def _batches(items: Sequence[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, `size` at a time (only the last window of a
    corpus is shorter, so padding is never needed)."""
    for _, group in groupby(items, key=lambda w: len(w.input_ids)):
        group = list(group)
        for i in range(0, len(group), size):
            yield group[i : i + size]


def scored_nll(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_scored"]:
    """Each scored token's NLL (float64, on the CPU; differentiable)."""
    targets = targets.flatten()
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets, ignore_index=IGNORE, reduction="none"
    )
    return nll[targets != IGNORE].double().cpu()


def measured(
    dtype: torch.dtype,
    corpus: str,
    protocol: Protocol,
    losses: list[Tensor],
    cut: list[Window],
    edits: Mapping[int, EditedColumns] | None = None,
) -> PerplexityResult:
    """The result of scoring `cut`'s windows (`losses`: their scored tokens' NLLs, in
    order), refused in one line where a logit overflowed `dtype`."""
    token_nll = torch.cat(losses)
    if not torch.isfinite(token_nll).all():
        raise NonFiniteActivation(
            f"perplexity is not finite in {dtype}: the logits overflowed; "
            f"use --dtype bfloat16 or float32"
        )
    return PerplexityResult(
        corpus=corpus,
        protocol=protocol,
        n_tokens=len(token_nll),
        nll=float(token_nll.mean()),
        token_nll=token_nll,
        positions=torch.cat([w.positions for w in cut]),
        n_restored=sum(e.n_restored for e in (edits or {}).values()),
    )


def batches_on(
    cut: list[Window], protocol: Protocol, device
) -> list[Callable[[], tuple[Tensor, Tensor]]]:
    """The protocol's batches of `cut`, each a call that gives (input_ids, targets) on
    `device`: for callers that count batches before running them."""
    return [
        lambda batch=batch: (
            torch.stack([w.input_ids for w in batch]).to(device),
            torch.stack([w.targets for w in batch]).to(device),
        )
        for batch in _batches(cut, protocol.batch_size)
    ]


def window_batches(
    cut: list[Window], protocol: Protocol, device, desc: str, layers: Sequence[nn.Module] = ()
) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids, targets) per batch, on `device`, with progress in windows
    (`sw_lens.progress`): advanced per decoder layer when the forward's `layers` are
    given, else once the caller asks for the next batch."""
    with progress.bar(desc=desc, unit="window", total=len(cut)) as shown:
        with progress.per_layer(shown, layers) as carrying:
            for batch in batches_on(cut, protocol, device):
                input_ids, targets = batch()
                carrying(len(input_ids))
                yield input_ids, targets
                if not layers:
                    shown.update(len(input_ids))


def evaluate(
    model: TransformerBridge,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    ablation: Sequence[WeightCoord] = (),
    scale: float = 0.0,
    fwd_hooks: Sequence = (),
    desc: str = "perplexity",
    restore_above: Restore | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `tokens` under `protocol`, with each weight in `ablation`
    multiplied by `scale` (0: zeroed) and, with `restore_above`, the super activation put
    back where it was massive (`patching.EditedColumns`). Use the same tokens and protocol
    for a baseline and its ablations: the per-token NLLs are then paired.

    Without TransformerLens `fwd_hooks` the forward runs in the model's HF twin with the
    fast attention kernel (`sw_lens.fast`); with them, in the bridge (eager attention)."""
    check_window(model.cfg.n_ctx, protocol)
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    edits = column_edits(model, ablation, scale, restore_above)
    losses = []
    with torch.inference_mode(), forward_pass(model, edits, fwd_hooks) as (logits_of, layers):
        for input_ids, targets in window_batches(cut, protocol, model.cfg.device, desc, layers):
            losses.append(scored_nll(logits_of(input_ids), targets))
    return measured(model.cfg.dtype, corpus, protocol, losses, cut, edits)


def per_ablation(scale: float | Sequence[float], ablations: Sequence) -> list[float]:
    """One scale per ablation: `scale` for each, or the sequence given, one each."""
    scales = [scale] * len(ablations) if isinstance(scale, int | float) else list(scale)
    if len(scales) != len(ablations):
        raise SwLensError(f"{len(ablations)} ablations but {len(scales)} scales")
    return scales


def evaluate_sweep(
    model: TransformerBridge,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    ablations: Sequence[Sequence[WeightCoord]],
    scale: float | Sequence[float] = 0.0,
    desc: str = "sweep",
) -> tuple[PerplexityResult, list[PerplexityResult]]:
    """A baseline and K ablations on the same windows (each with its own `scale` when a
    sequence is given: a scaling curve), each ablation computing only the layers from its
    earliest ablated layer L on: the residual stream entering L is kept from the baseline
    pass, and the ablation runs layers L..n only. Cost ~ 1 + sum over ablations of
    (n - L) / n passes (plus the unembedding) instead of K + 1; results equal the naive
    loop of `evaluate` calls.

    Runs in the HF twin (TransformerLens's own ``start_at_layer`` still computes the
    skipped blocks); `fast.Resume` checks that feeding a kept residual back in is exact
    for this model, else ablations run the whole model, with the same results."""
    check_window(model.cfg.n_ctx, protocol)
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    scales = per_ablation(scale, ablations)
    edits = [column_edits(model, a, s) for a, s in zip(ablations, scales, strict=True)]
    starts = [min((c.layer for c in a), default=0) for a in ablations]
    resume = Resume(model, starts)
    losses: list[list[Tensor]] = [[] for _ in range(len(ablations) + 1)]
    with torch.inference_mode():
        for input_ids, targets in window_batches(cut, protocol, model.cfg.device, desc):
            resume.check(input_ids)
            with resume.keeping() as kept:  # the baseline pass only: ablations see edits
                losses[0].append(
                    scored_nll(resume.twin(input_ids, use_cache=False).logits, targets)
                )
            for k, (edit, start) in enumerate(zip(edits, starts, strict=True), start=1):
                with twin_ablation(model, edit):
                    losses[k].append(scored_nll(resume.run(start, kept, input_ids), targets))
    dtype = model.cfg.dtype
    baseline, *ablated = (measured(dtype, corpus, protocol, loss, cut) for loss in losses)
    return baseline, ablated


def paired_token_loss(
    tokenizer,
    tokens: Int[Tensor, "n_tokens"],
    baseline: PerplexityResult,
    ablated: PerplexityResult,
    limit: int,
) -> dict:
    """Per-token NLL before and after an ablation, for the first `limit` scored tokens in
    corpus order: what the token-loss page colours. Both results must come from the same
    tokens and protocol."""
    if not torch.equal(baseline.positions, ablated.positions):
        raise SwLensError("baseline and ablation were not scored on the same tokens")
    order = baseline.positions.argsort()[:limit]
    positions = baseline.positions[order]
    before, after = baseline.token_nll[order], ablated.token_nll[order]
    return {
        "tokens": [tokenizer.decode([int(tokens[p])]) for p in positions],
        "positions": positions.tolist(),
        "baseline_nll": before.tolist(),
        "ablated_nll": after.tolist(),
        "delta": (after - before).tolist(),
    }
