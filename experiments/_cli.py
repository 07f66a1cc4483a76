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
import threading  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub  # noqa: E402
import transformers  # noqa: E402

from sw_lens import progress  # noqa: E402
from sw_lens.documents import Experiment, Header, PerplexityResult  # noqa: E402
from sw_lens.errors import SwLensError  # noqa: E402
from sw_lens.experiment import prepare  # noqa: E402
from sw_lens.options import add_options, from_args  # noqa: E402
from sw_lens.results import check_writable, staged_folder, write_json  # noqa: E402
from sw_lens.setup import JOB, LocateConfig  # noqa: E402

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


def experiment_parser(
    description: str, own: type, defaults: dict | None = None
) -> argparse.ArgumentParser:
    """The parser of an experiment on super weights: the job's options (`JOB`), the
    experiment's `own` options, and where the super weights come from (default: found
    now by the locate rule)."""
    p = Parser(description=description)
    add_options(p, LocateConfig, JOB, defaults=defaults, helps=WEIGHT_HELP)
    add_options(p, own)
    p.add_argument(
        "--results", help="take the super weights of this locate results.json (same model)"
    )
    add_out(p)
    return p


WEIGHT_HELP = {"weight": "the super weight: HF down_proj.weight[ROW, COL] of layer LAYER; repeat"}


def add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="output directory (default: out/<model>)")


def experiment(description: str, own: type, defaults: dict | None = None, streamable: bool = False):
    """Parse an experiment's command line, load what it names (streamed, for a
    `streamable` experiment, when --stream says so) and choose the super weights: (args,
    the prepared `Experiment`, the experiment's own options)."""
    args = experiment_parser(description, own, defaults).parse_args()
    output_dir(args)  # an unwritable --out fails before the work, not after it
    options = from_args(own, args)  # a bad option fails before the model loads
    config = from_args(LocateConfig, args)
    return args, prepare(config, args.results, streamable), options


def output_dir(args: argparse.Namespace) -> Path:
    """The output folder, checked to be writable: commands call this before their work."""
    return check_writable(args.out or Path("out") / Path(args.model).name)


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


def save_results(args: argparse.Namespace, stem: str, document: Header, draw) -> None:
    """Write ``<stem>.json`` and the figures `draw` makes from it into the output folder,
    all or nothing; say where they went."""
    out = output_dir(args)

    def write(folder: Path) -> list[Path]:
        return [write_json(folder / f"{stem}.json", document), *draw(document, folder)]

    paths = publish(out, write)
    print(f"\nwrote {paths[0]} and {len(paths) - 1} figure files in {out}")


def print_header(document: Experiment, baseline: PerplexityResult | None = None) -> None:
    model = document.model
    print(f"\n{model.name} ({model.architecture}, {model.n_layers} layers)")
    for w in document.super_weights:
        print(
            f"  super weight: layer {w.layer} down_proj.weight[{w.row}, {w.col}] = "
            f"{w.value:+.4g} (W_out[{w.layer}][{w.col}, {w.row}])"
        )
    print(f"  chosen: {document.super_weight_source}")
    if document.execution and document.execution.streamed:
        print(f"  streamed ({document.execution.why}): {document.execution.description}")
    if baseline is None:
        return
    print(
        f"perplexity on {baseline.corpus}: {baseline.protocol_description}, "
        f"{baseline.n_tokens} tokens scored; baseline {baseline.perplexity:.3f}"
    )
