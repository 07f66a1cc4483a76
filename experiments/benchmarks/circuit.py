"""The circuit analyses' cost on one model, in single-pass equivalents measured in this
process: one pass = the clean model's loss on the circuit's corpus windows (the twin,
no gradients), timed here; attribution patching and the full exact patching sweep
(every component, both directions) are timed on the same windows and divided by it.
The layer-runs each counts (`Mediation.passes`) and the naive cost of exact patching
without resuming at the component's layer (two whole passes per component, plus the
clean and zeroed runs) are printed beside them.

Default: the embedded SmolLM2-135M with its super weights as the search finds them, on
CPU, the circuit command's default budget. --tiny uses a small random Llama-shaped
model: the CI smoke run, whose ratios mean nothing.
"""

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import parser, table
from run import tiny_model

from experiments._cli import run
from sw_lens.experiment import prepare
from sw_lens.mediation import attribution_patching, components, exact_patching
from sw_lens.perplexity import evaluate, windows
from sw_lens.setup import LocateConfig
from sw_lens.studies import CircuitOptions

ATTRIBUTION_TARGET = 3.0  # passes (issue: attribution patching at most 3 passes)


def timed(step):
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, result


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=CircuitOptions().circuit_tokens)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = LocateConfig(device=args.device)
        if args.tiny:
            config = LocateConfig(
                model=tiny_model(Path(tmp)), device=args.device, window=64, max_tokens=256,
                weights=["1,5,17"],
            )  # fmt: skip
        experiment = prepare(config)
    setup, coords = experiment.setup, experiment.coords
    model = setup.model
    protocol = replace(setup.protocol, max_tokens=args.tokens)
    cut = windows(setup.tokens, protocol, model.tokenizer.bos_token_id)
    evaluate(model, setup.tokens, protocol, "warm-up")
    unit = min(timed(lambda: evaluate(model, setup.tokens, protocol, "pass"))[0] for _ in range(2))
    attribution_s, attribution = timed(lambda: attribution_patching(model, coords, cut, protocol))
    exact_s, exact = timed(lambda: exact_patching(model, coords, cut, protocol))
    n = len(components(model, coords))
    naive = 2 + 2 * n
    beyond = attribution_s / unit - 1  # its zeroed forward and backward; the clean pass aside
    print(
        f"model {setup.loaded.name} on {setup.loaded.device}; super weights "
        f"{', '.join(map(str, coords))}; one pass = the clean loss on {len(cut)} windows "
        f"({protocol.describe()}): {unit:.2f} s"
    )
    print(
        table(
            f"Circuit patching cost: {n} components from layer {min(c.layer for c in coords)} on",
            ["analysis", "seconds", "passes (timed)", "layer-runs counted", "naive passes"],
            [
                [
                    "attribution patching (clean + zeroed forward + backward)",
                    f"{attribution_s:.1f}",
                    f"{attribution_s / unit:.2f}",
                    f"{attribution.passes:.2f}",
                    "3",
                ],
                [
                    "  beyond the clean pass (zeroed forward + backward)",
                    "",
                    f"{beyond:.2f}",
                    f"{attribution.passes - 1:.2f}",
                    "2",
                ],
                [
                    "exact patching, every component, both directions",
                    f"{exact_s:.1f}",
                    f"{exact_s / unit:.1f}",
                    f"{exact.passes:.1f}",
                    f"{naive}",
                ],
                [
                    "  per component and direction",
                    f"{exact_s / (2 * n):.2f}",
                    f"{exact_s / unit / (2 * n):.3f}",
                    f"{exact.passes / (2 * n):.3f}",
                    "1",
                ],
            ],
        )  # fmt: skip
    )
    for what, passes in (("with its clean pass", attribution_s / unit), ("beyond it", beyond)):
        met = "met" if passes <= ATTRIBUTION_TARGET else "NOT met"
        print(f"attribution patching <= {ATTRIBUTION_TARGET:g} passes, {what}: {met}")


if __name__ == "__main__":
    run(main)
