"""Zero the super weights, then put their super activations back: how much of the loss
does the activation alone account for? The activation is restored at the super weight's
output channel wherever the unablated value is at least --fraction of the super
activation measured on the scanned prompts. Writes restore.json and a figure.
"""

from _cli import (
    experiment_parser,
    experiment_setup,
    finite_float,
    print_header,
    run,
    save_results,
)

from sw_lens.experiment import experiment_document
from sw_lens.figures import restore_figure
from sw_lens.restore import restore


def main() -> None:
    p = experiment_parser(__doc__, max_tokens=4096)
    p.add_argument(
        "--fraction",
        type=finite_float,
        default=0.1,
        help="restore where |unablated output| >= this x the super activation",
    )
    args = p.parse_args()
    config, setup, coords, source = experiment_setup(args)
    result = restore(
        setup.model,
        setup.tokens,
        setup.protocol,
        setup.corpus.name,
        coords,
        setup.texts,
        args.fraction,
    )
    document = experiment_document("restore", setup, config, coords, source) | {
        "fraction": args.fraction,
        "super_activations": [
            {"layer": layer, "row": row, "value": value, "threshold": result.thresholds[layer, row]}
            for (layer, row), value in result.super_activations.items()
        ],
        "baseline": result.baseline.to_dict(),
        "zeroed": result.ablated.to_dict(),
        "restored": result.restored.to_dict(),
        "recovered": result.recovered,
    }
    print_header(document, document["baseline"])
    for a in document["super_activations"]:
        print(
            f"  super activation: blocks.{a['layer']}.hook_mlp_out[:, {a['row']}] = "
            f"{a['value']:.4g} on the prompts; restored where |value| >= {a['threshold']:.4g}"
        )
    n = result.restored.n_restored
    print(f"  {'super weights zeroed':<40} {result.ablated.perplexity:>10.3f}")
    print(
        f"  {'... super activation restored':<40} {result.restored.perplexity:>10.3f}  "
        f"({n} of {result.restored.n_tokens} positions restored)"
    )
    print(f"  recovered {result.recovered:.1%} of the loss increase (mean NLL)")
    save_results(args, "restore", document, restore_figure)


if __name__ == "__main__":
    run(main)
