"""The threshold-free search's cost and memory on one model, as ratios measured in this
process: time in single-pass equivalents (one pass = the baseline perplexity on the
reported budget, timed here), against a plain locate run (the whole job with
``find="rule"``: load, scan, the rule's candidates ranked, the report); and the search's
peak memory above the loaded model (Linux: the peak resident set, reset before each
step).

Default: the embedded SmolLM2-135M with the default options, on CPU. --tiny uses a
small random Llama-shaped model: the CI smoke run, whose ratios mean nothing.
"""

import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import parser, table
from run import tiny_model

from experiments._cli import run
from sw_lens import search
from sw_lens.experiment import find
from sw_lens.locate_job import run_locate
from sw_lens.perplexity import evaluate
from sw_lens.setup import LocateConfig, load


def resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process, from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024)


def measured(step):
    """Seconds and peak resident bytes above the start of `step()`, and its result."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current size
    before, _ = resident()
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    return seconds, resident()[1] - before, result


class Phases:
    """Seconds spent in the search's screens and in its confirmation, by wrapping those
    functions of `sw_lens.search` while the search runs."""

    def __init__(self, names: tuple[str, ...]):
        self.seconds = dict.fromkeys(names, 0.0)

    def __enter__(self):
        self.originals = {name: getattr(search, name) for name in self.seconds}
        for name, original in self.originals.items():
            setattr(search, name, self._timed(name, original))
        return self

    def _timed(self, name, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(search, name, original)


def command(argv: list[str]) -> float:
    """Wall-clock seconds of the locate command in a fresh interpreter."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "experiments.locate", "--quiet", *argv],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = LocateConfig(device=args.device)
        if args.tiny:
            config = LocateConfig(
                model=tiny_model(Path(tmp)), device=args.device, window=64, max_tokens=256,
                rank_tokens=128, prompts=["Apple Inc. is a tech company."],
            )  # fmt: skip
        setup = load(config)
        evaluate(setup.model, setup.tokens, setup.protocol, "warm-up")
        unit = min(
            measured(lambda: evaluate(setup.model, setup.tokens, setup.protocol, "pass"))[0]
            for _ in range(2)
        )
        plain_s, plain_mem, _ = measured(lambda: run_locate(replace(config, find="rule")))
        with Phases(("post_maxima", "squared_gradients", "_confirm")) as phases:
            search_s, search_mem, found = measured(lambda: find(setup, config))
        job_s, _, _ = measured(lambda: run_locate(config))
        model = ["--model", config.model, "--device", args.device]
        if args.tiny:
            model += ["--window", "64", "--max-tokens", "256", "--rank-tokens", "128"]
        commands = {
            f"python -m experiments.locate --find rule ({config.model})": command(
                [*model, "--find", "rule", "--out", f"{tmp}/rule"]
            ),
            f"python -m experiments.locate ({config.model})": command(
                [*model, "--out", f"{tmp}/search"]
            ),
        }
    result = found.search
    spent = phases.seconds
    screens = spent["post_maxima"] + spent["squared_gradients"]
    measuring = search_s - screens - spent["_confirm"]
    parts = [
        ("  screens (largest contribution, saliency)", screens),
        (f"  {len(result.measured)} weights zeroed alone on the ranking budget", measuring),
        (f"  {len(result.confirmed)} near or above the criterion, on the reported budget",
         spent["_confirm"]),
    ]  # fmt: skip
    rows = [
        ["plain locate run (find=rule)", f"{plain_s:.1f}", f"{plain_s / unit:.1f}", "1.00",
         f"{plain_mem / 2**20:.0f}"],
        ["the search (screens, measurements, confirmation)", f"{search_s:.1f}",
         f"{search_s / unit:.1f}", f"{search_s / plain_s:.2f}", f"{search_mem / 2**20:.0f}"],
        *([name, f"{t:.1f}", f"{t / unit:.1f}", f"{t / plain_s:.2f}", ""] for name, t in parts),
        ["locate run with the search (default)", f"{job_s:.1f}", f"{job_s / unit:.1f}",
         f"{job_s / plain_s:.2f}", ""],
    ]  # fmt: skip
    print(f"model {setup.loaded.name} on {setup.loaded.device}; one pass = the baseline on "
          f"{setup.protocol.describe()}: {unit:.2f} s")  # fmt: skip
    print(
        table(
            f"Threshold-free search: {len(result.measured)} weights measured, "
            f"{len(result.confirmed)} confirmed on the reported budget; {result.verdict()}",
            ["what", "seconds", "passes", "x plain run", "peak MiB above its start"],
            rows,
        )
    )
    plain_command = next(iter(commands.values()))
    print(
        table(
            "The commands as a user runs them (wall clock: start-up, loading, figures included)",
            ["command", "seconds", "the search above, x this"],
            [[name, f"{t:.1f}", f"{search_s / t:.2f}"] for name, t in commands.items()][:1]
            + [[name, f"{t:.1f}", ""] for name, t in list(commands.items())[1:]],
        )
    )
    print(f"(the plain command: {plain_command:.1f} s = {plain_command / unit:.1f} passes)")


if __name__ == "__main__":
    run(main)
