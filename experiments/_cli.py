"""What every command shares: quiet logging, errors as one line with exit code 2, and the
options that mean the same in every command."""

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

import huggingface_hub
import transformers

from sw_lens.corpora import DEFAULT_CORPUS, NAMED
from sw_lens.errors import SwLensError
from sw_lens.locate import Criterion
from sw_lens.models import DTYPES
from sw_lens.patching import WeightCoord

_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came at any time. Python drops an exception
    raised while a ``__del__`` runs, so a Ctrl-C can be swallowed; commands call this
    before writing results so that an interrupted run never writes any."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def run(main: Callable[[], None]) -> None:
    """Call `main`; a `SwLensError` becomes ``error: ...`` and exit 2, Ctrl-C exit 130."""
    signal.signal(signal.SIGINT, _on_sigint)
    default_hook = sys.unraisablehook
    # A Ctrl-C swallowed inside a __del__ is remembered by _on_sigint; don't print it.
    sys.unraisablehook = lambda unraisable: (
        None if isinstance(unraisable.exc_value, KeyboardInterrupt) else default_hook(unraisable)
    )
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logging.getLogger("sw_lens").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars, not our work
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # retries are summed up in our error
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except SwLensError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        sys.exit(130)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def weight_coord(text: str) -> WeightCoord:
    """LAYER,ROW,COL of HF ``down_proj.weight[ROW, COL]``."""
    try:
        layer, row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER,ROW,COL integers, got {text!r}") from None
    return WeightCoord(layer, row, col)


def add_loading_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument(
        "--tokenizer",
        help="for nanoGPT .pt checkpoints: meta.pkl or an HF tokenizer (default: meta.pkl "
        "found beside the checkpoint or in data/<dataset>/, else GPT-2's BPE)",
    )


def add_corpus_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument(
        "--text",
        default=DEFAULT_CORPUS,
        help=f"perplexity corpus: a UTF-8 file or one of {', '.join(NAMED)}",
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=max_tokens, help="corpus tokens for perplexity"
    )
    p.add_argument(
        "--window", type=positive_int, default=512, help="tokens per window, BOS included"
    )
    p.add_argument(
        "--stride", type=positive_int, help="sliding-window stride (default: non-overlapping)"
    )
    p.add_argument("--batch-size", type=positive_int, default=4)


def add_rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--iterations", type=positive_int, default=5, help="maximum scans (ablate, rescan)"
    )
    p.add_argument(
        "--threshold", type=float, default=Criterion.min_abs, help="min |activation| of a spike"
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=Criterion.min_ratio,
        help="min spike / median over layers of the same hook's spike",
    )
    p.add_argument(
        "--min-ppl-ratio",
        type=float,
        default=Criterion.min_ppl_ratio,
        help="perplexity ratio (zeroed alone / baseline) to call a weight super",
    )


def criterion(args: argparse.Namespace) -> Criterion:
    return Criterion(args.threshold, args.min_ratio, args.min_ppl_ratio)
