"""What every command shares: quiet logging, errors as one line with exit code 2, Ctrl-C
as exit 130 with a true message, results written all or nothing, and the options that
mean the same in every command."""

import os
import signal
import sys


def _interrupted_at_startup(signum, frame) -> None:
    """Ctrl-C while the heavy imports below load (seconds): nothing exists yet."""
    print("interrupted: no results were written", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_at_startup)

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub  # noqa: E402
import transformers  # noqa: E402

from sw_lens import progress  # noqa: E402
from sw_lens.corpora import DEFAULT_CORPUS, NAMED  # noqa: E402
from sw_lens.errors import SwLensError  # noqa: E402
from sw_lens.experiment import super_weights  # noqa: E402
from sw_lens.locate import Criterion  # noqa: E402
from sw_lens.models import DEFAULT_MODEL, DTYPES, EMBEDDED  # noqa: E402
from sw_lens.results import check_writable, staged_folder, write_json  # noqa: E402
from sw_lens.setup import PAPER_PROMPT, LocateConfig, Setup, load  # noqa: E402
from sw_lens.vocabulary import WeightCoord  # noqa: E402

_interrupted = threading.Event()
_moving = threading.Event()  # results are being moved into place: Ctrl-C waits
_published: list[Path] = []  # output folders whose results are complete on disk


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    if not _moving.is_set():
        raise KeyboardInterrupt


def reset() -> None:
    """Forget a finished command's Ctrl-C and output folders (for running commands one
    after another in one process, as the tests do)."""
    _interrupted.clear()
    _published.clear()


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
        if _published:
            where = ", ".join(str(p) for p in _published)
            print(f"interrupted: results were already complete in {where}", file=sys.stderr)
        else:
            print("interrupted: no results were written", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The command's docstring as written, and each default once: not for options without
    one (None, a flag's False) or whose help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default == [] or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the house's format: a usage mistake is one line and exit 2; help
    shows each default once; every command takes --quiet."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self.add_argument(
            "--quiet",
            action="store_true",
            help="no progress bars or progress lines (with stderr redirected, a line every "
            f"{progress.LINE_INTERVAL:.0f} s is the default)",
        )

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        progress.configure(quiet=parsed.quiet)
        return parsed, rest

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        wanted = {0: "a non-negative integer", 1: "a positive integer"}[minimum]
        upper = f" <= {maximum}" if maximum is not None else ""
        raise argparse.ArgumentTypeError(f"must be {wanted}{upper}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    return _int(text, 0)


def seed(text: str) -> int:
    """A seed every generator takes (numpy's limit is the smallest)."""
    return _int(text, 0, 2**32 - 1)


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite: refused here, not after minutes of work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
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
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and compute")
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
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")


def add_rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--iterations", type=positive_int, default=5, help="maximum scans (ablate, rescan)"
    )
    p.add_argument(
        "--threshold",
        type=finite_float,
        default=Criterion.min_abs,
        help="min |activation| of a spike",
    )
    p.add_argument(
        "--min-ratio",
        type=finite_float,
        default=Criterion.min_ratio,
        help="min spike / median over layers of the same hook's spike",
    )
    p.add_argument(
        "--min-ppl-ratio",
        type=finite_float,
        default=Criterion.min_ppl_ratio,
        help="perplexity ratio (zeroed alone / baseline) to call a weight super",
    )


def criterion(args: argparse.Namespace) -> Criterion:
    return Criterion(args.threshold, args.min_ratio, args.min_ppl_ratio)


def add_job_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The options of every job that loads a model, scans prompts and measures perplexity."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id (e.g. gpt2, Qwen/Qwen2.5-3B; HF cache works offline), HF-format "
        f"directory, .gguf file, nanoGPT ckpt.pt, or embedded: {', '.join(EMBEDDED)}",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help=f"text to scan for spikes; repeat for several; none given: {PAPER_PROMPT!r}",
    )
    add_loading_args(p)
    add_corpus_args(p, max_tokens=max_tokens)
    p.add_argument(
        "--rank-tokens", type=positive_int, default=1024, help="corpus tokens per effect ranking"
    )
    p.add_argument(
        "--bos",
        default="auto",
        choices=["auto", "yes", "no"],
        help="prepend BOS (auto: as the model's tokenizer does)",
    )
    add_rule_args(p)
    p.add_argument("--out", type=Path, help="output directory (default: out/<model>)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code")
    p.add_argument("--seed", type=seed, default=0, help="0 to 2**32 - 1")


def add_weight_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--weight",
        action="append",
        type=weight_coord,
        default=[],
        metavar="LAYER,ROW,COL",
        help=f"{help}: HF down_proj.weight[ROW, COL] of layer LAYER; repeat for several",
    )


def experiment_parser(description: str, max_tokens: int) -> argparse.ArgumentParser:
    """The parser of an experiment on super weights: the job's options, and which super
    weights (default: found now by the locate rule)."""
    p = Parser(description=description)
    add_job_args(p, max_tokens)
    add_weight_arg(p, "the super weight")
    p.add_argument(
        "--results", help="take the super weights of this locate results.json (same model)"
    )
    return p


def experiment_setup(args: argparse.Namespace) -> tuple[LocateConfig, Setup, list, str]:
    """Load what `args` name and choose the super weights: (config, setup, weights, how
    they were chosen)."""
    output_dir(args)  # an unwritable --out fails before the work, not after it
    config = locate_config(args)
    setup = load(config)
    return (config, setup, *super_weights(setup, config, args.results))


def locate_config(args: argparse.Namespace) -> LocateConfig:
    return LocateConfig(
        model=args.model,
        text=args.text,
        prompts=args.prompt or [PAPER_PROMPT],
        device=args.device,
        dtype=args.dtype,
        window=args.window,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        rank_tokens=args.rank_tokens,
        bos=args.bos,
        iterations=args.iterations,
        criterion=criterion(args),
        weights=args.weight,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        seed=args.seed,
    )


def output_dir(args: argparse.Namespace) -> Path:
    """The output folder, checked to be writable: commands call this before their work."""
    return check_writable(args.out or Path("out") / Path(args.model).name)


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. ``0.5,2``."""
    return [finite_float(v) for v in text.split(",") if v.strip()]


def publish(out: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Run `write(folder)`, which writes every file of a result into `folder`; the files
    reach `out` together or not at all (`staged_folder`). A Ctrl-C before the move
    leaves `out` as it was; one during the move (milliseconds) waits for it to finish,
    and then says that the results were written."""
    check_interrupted()
    try:
        with staged_folder(out) as staging:
            names = [path.name for path in write(staging)]
            check_interrupted()
            _moving.set()
        _published.append(out)
    finally:
        _moving.clear()
    check_interrupted()
    return [out / name for name in names]


def save_results(args: argparse.Namespace, stem: str, document: dict, draw) -> None:
    """Write ``<stem>.json`` and the figures `draw` makes from it into the output folder,
    all or nothing; say where they went."""
    out = output_dir(args)

    def write(folder: Path) -> list[Path]:
        return [write_json(folder / f"{stem}.json", document), *draw(document, folder)]

    paths = publish(out, write)
    print(f"\nwrote {paths[0]} and {len(paths) - 1} figure files in {out}")


def print_header(document: dict, baseline: dict | None = None) -> None:
    model = document["model"]
    print(f"\n{model['name']} ({model['architecture']}, {model['n_layers']} layers)")
    for w in document["super_weights"]:
        print(
            f"  super weight: layer {w['layer']} down_proj.weight[{w['row']}, {w['col']}] = "
            f"{w['value']:+.4g} (W_out[{w['layer']}][{w['col']}, {w['row']}])"
        )
    print(f"  chosen: {document['super_weight_source']}")
    if baseline is None:
        return
    print(
        f"perplexity on {baseline['corpus']}: {baseline['protocol_description']}, "
        f"{baseline['n_tokens']} tokens scored; baseline {baseline['perplexity']:.3f}"
    )
