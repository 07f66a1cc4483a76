"""Is the super weight special, or would zeroing any large weight do the same? Perplexity
with (a) the super weights zeroed, (b) the N largest-magnitude down-projection weights
zeroed (super weights excluded; the paper's N = 7000), (c) both, (d) R random draws of as
many weights as (a), each matched in magnitude to a super weight in its own matrix, and
(e) the super weights scaled instead of zeroed. Writes controls.json and a figure.
"""

from dataclasses import asdict

from _cli import (
    experiment_parser,
    experiment_setup,
    float_list,
    non_negative_int,
    positive_int,
    print_header,
    run,
    save_results,
)

from sw_lens.controls import run_controls
from sw_lens.experiment import experiment_document
from sw_lens.figures import controls_figure


def main() -> None:
    p = experiment_parser(__doc__, max_tokens=4096)
    p.add_argument("--n-largest", type=non_negative_int, default=7000, help="N of control (b)")
    p.add_argument(
        "--draws", type=non_negative_int, default=10, help="R random draws of control (d)"
    )
    p.add_argument(
        "--pool",
        type=positive_int,
        default=100,
        help="(d) draws from this many weights nearest in |w| to each super weight",
    )
    p.add_argument("--scales", type=float_list, default=[0.5, 2.0], help="factors of (e)")
    args = p.parse_args()
    config, setup, coords, source = experiment_setup(args)
    baseline, rows, draws = run_controls(
        setup.model,
        setup.tokens,
        setup.protocol,
        setup.corpus.name,
        coords,
        n_largest=args.n_largest,
        draws=args.draws,
        scales=args.scales,
        pool=args.pool,
        seed=args.seed,
    )
    document = experiment_document("controls", setup, config, coords, source) | {
        "baseline": baseline.to_dict(),
        "controls": [asdict(r) for r in rows],
        "summary": draws,
    }
    print_header(document, document["baseline"])
    for r in rows:
        print(f"  {r.label:<48} {r.n_weights:>6} weights {r.perplexity:>10.3f}  (x{r.ratio:.3f})")
    if draws["draws"]:
        std = f" +- {draws['std']:.3f}" if draws["std"] is not None else ""
        print(
            f"  (d) over {draws['draws']} draws: mean {draws['mean']:.3f}{std} "
            f"(min {draws['min']:.3f}, max {draws['max']:.3f})"
        )
    if rows[1].n_weights:
        print(
            f"  (b) is {draws['largest_share']:.2e} of all down-projection weights (the "
            f"paper's 7000 in Llama-7B: 4.9e-06) and reaches down to |w| = "
            f"{draws['largest_min_abs']:.4g}"
        )
    save_results(args, "controls", document, controls_figure)


if __name__ == "__main__":
    run(main)
