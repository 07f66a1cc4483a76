"""Progress that people can see where they run it.

In a terminal: tqdm bars, advanced per decoder layer where a forward is long, so a bar
never sits at 0% for the minute a batch of a large model takes. With stderr redirected
(a SLURM job, ``nohup``, CI) a bar is invisible or a wall of carriage returns, so a plain
line is printed instead, at a steady interval: stage, done / total, rate, time left.
``quiet`` turns both off.
"""

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn
from tqdm.auto import tqdm

LINE_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal
_settings = {"quiet": False, "interval": LINE_INTERVAL}


def configure(quiet: bool = False, interval: float = LINE_INTERVAL) -> None:
    """Set once by a command (``--quiet``); the library's default is to show progress."""
    _settings.update(quiet=quiet, interval=interval)


class _Lines:
    """A stream for tqdm that turns each refresh into one line of a log file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(
    iterable: Iterable | None = None, *, desc: str, unit: str, total: float | None = None
) -> tqdm:
    """A progress bar in a terminal, progress lines in a log, nothing when quiet."""
    if _settings["quiet"]:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False)
    interval = _settings["interval"]
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        file=_Lines(sys.stderr),
        mininterval=interval,
        maxinterval=interval,
        bar_format="{desc}: {n:.0f}/{total_fmt} {unit}s done, {rate_fmt}, {remaining} left",
    )


@contextmanager
def per_layer(progress: tqdm, layers: Sequence[nn.Module]) -> Iterator[Callable[[int], None]]:
    """While the block runs, each forward of one of `layers` advances `progress` by its
    share of the windows the current forward carries, so the bar moves within a batch.
    Yields `carrying(n)`: call it before each forward with its number of windows."""
    share = [0.0]

    def tick(*_) -> None:  # a forward hook that returns something replaces the output
        progress.update(share[0])

    handles = [layer.register_forward_hook(tick) for layer in layers]
    try:
        yield lambda n: share.__setitem__(0, n / max(len(layers), 1))
    finally:
        for handle in handles:
            handle.remove()
