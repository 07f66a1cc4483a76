"""Super-weight-aware quantization (paper, Sec. 5): round-to-nearest asymmetric
quantization of every down-projection (or, with --all-linear, every linear layer of the
decoder) at each bit width and block size, (i) plain, (ii) with outliers clipped, and
(iii) clipped with the super weights kept in full precision and restored after
quantization. The claim to check: (iii) beats (i) and (ii) at large blocks. Weights are
written in place for each setting and restored bit-for-bit. Writes quantize.json and a
figure.
"""

import argparse

from _cli import (
    experiment_parser,
    experiment_setup,
    finite_float,
    positive_int,
    print_header,
    run,
    save_results,
)

from sw_lens.experiment import experiment_document
from sw_lens.figures import quantize_figure
from sw_lens.perplexity import evaluate
from sw_lens.progress import bar
from sw_lens.quantize import CLIPS, METHODS, Scheme, quantized


def block_size(text: str) -> int | None:
    if text == "tensor":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        message = f"a block size is a positive integer or 'tensor', got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def main() -> None:
    p = experiment_parser(__doc__, max_tokens=2048)
    p.add_argument("--bits", type=positive_int, nargs="+", default=[8, 4, 3])
    p.add_argument(
        "--blocks",
        type=block_size,
        nargs="+",
        default=[None, 65536, 16384, 128],
        help="block sizes in elements of the stored weight; 'tensor' for one block",
    )
    p.add_argument("--clip", choices=CLIPS, default="zscore", help="outlier clipping")
    p.add_argument(
        "--clip-value",
        type=finite_float,
        default=6.0,
        help="z-score (zscore) or percentile of |w| (percentile) to clip at",
    )
    p.add_argument("--all-linear", action="store_true", help="quantize every decoder linear layer")
    args = p.parse_args()
    schemes = [
        Scheme(bits, block, method, args.clip, args.clip_value)
        for bits in args.bits
        for block in args.blocks
        for method in METHODS
    ]
    config, setup, coords, source = experiment_setup(args)
    model, tokens, protocol, corpus = setup.model, setup.tokens, setup.protocol, setup.corpus.name
    baseline = evaluate(model, tokens, protocol, corpus, desc="baseline")
    rows = []
    for scheme in bar(schemes, desc="quantize", unit="setting"):
        with quantized(model, scheme, coords, args.all_linear) as names:
            result = evaluate(model, tokens, protocol, corpus, desc=scheme.describe())
        rows.append(
            {
                "bits": scheme.bits,
                "block": "tensor" if scheme.block_size is None else scheme.block_size,
                "method": scheme.method,
                "description": scheme.describe(),
                "n_parameters": len(names),
                **result.to_dict(),
                "ratio": result.perplexity / baseline.perplexity,
            }
        )
    document = experiment_document("quantize", setup, config, coords, source) | {
        "clip": {"method": args.clip, "value": args.clip_value},
        "all_linear": args.all_linear,
        "baseline": baseline.to_dict(),
        "quantized": rows,
    }
    print_header(document, document["baseline"])
    what = "decoder linear layers" if args.all_linear else "down-projections"
    print(f"quantized: {rows[0]['n_parameters']} {what}; clip {args.clip} {args.clip_value:g}")
    print(f"  {'bits':>4} {'block':>7}  " + "".join(f"{m:>24}" for m in METHODS))
    for i in range(0, len(rows), len(METHODS)):
        group = rows[i : i + len(METHODS)]
        print(
            f"  {group[0]['bits']:>4} {group[0]['block']!s:>7}  "
            + "".join(f"{r['perplexity']:>24.3f}" for r in group)
        )
    save_results(args, "quantize", document, quantize_figure)


if __name__ == "__main__":
    run(main)
