"""Zero the super weights, then put their super activations back: how much of the loss
does the activation alone account for? The activation is restored at the super weight's
output channel wherever the unablated value is at least --fraction of the super
activation measured on the scanned prompts. Writes restore.json and a figure.
"""

from experiments._cli import experiment, print_header, run, save_results
from sw_lens.figures import restore_figure
from sw_lens.studies import RestoreOptions, restore_study


def main() -> None:
    args, prepared, options = experiment(__doc__, RestoreOptions, streamable=True)
    document = restore_study(prepared, options)
    print_header(document, document.baseline)
    for a in document.super_activations:
        print(
            f"  super activation: blocks.{a.layer}.hook_mlp_out[:, {a.row}] = "
            f"{a.value:.4g} on the prompts; restored where |value| >= {a.threshold:.4g}"
        )
    zeroed, restored = document.zeroed, document.restored
    print(f"  {'super weights zeroed':<40} {zeroed.perplexity:>10.3f}")
    print(
        f"  {'... super activation restored':<40} {restored.perplexity:>10.3f}  "
        f"({restored.n_restored} of {restored.n_tokens} positions restored)"
    )
    print(f"  recovered {document.recovered:.1%} of the loss increase (mean NLL)")
    save_results(args, "restore", document, restore_figure)


if __name__ == "__main__":
    run(main)
