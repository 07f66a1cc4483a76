"""Super-weight-aware quantization (paper, Sec. 5): round-to-nearest asymmetric
quantization of every down-projection (or, with --all-linear, every linear layer of the
decoder) at each bit width and block size, (i) plain, (ii) with outliers clipped, and
(iii) clipped with the super weights kept in full precision and restored after
quantization. The claim to check: (iii) beats (i) and (ii) at large blocks. Weights are
written in place for each setting and restored bit-for-bit. Writes quantize.json and a
figure.
"""

from experiments._cli import experiment, print_header, run, save_results
from sw_lens.figures import quantize_figure
from sw_lens.quantize import METHODS
from sw_lens.studies import QuantizeOptions, quantize_study


def main() -> None:
    args, prepared, options = experiment(
        __doc__, QuantizeOptions, {"max_tokens": 2048}, streamable=True
    )
    document = quantize_study(prepared, options)
    print_header(document, document.baseline)
    rows = document.quantized
    what = "decoder linear layers" if options.all_linear else "down-projections"
    print(f"quantized: {rows[0].n_parameters} {what}; clip {options.clip} {options.clip_value:g}")
    print(f"  {'bits':>4} {'block':>7}  " + "".join(f"{m:>24}" for m in METHODS))
    for i in range(0, len(rows), len(METHODS)):
        group = rows[i : i + len(METHODS)]
        print(
            f"  {group[0].bits:>4} {group[0].block!s:>7}  "
            + "".join(f"{r.perplexity:>24.3f}" for r in group)
        )
    save_results(args, "quantize", document, quantize_figure)


if __name__ == "__main__":
    run(main)
