"""Regenerate the figures of any sw_lens results file, without the model: a locate run's
results.json (every figure and the token-loss page), or the JSON of explain, robustness,
controls, restore, stopwords, scaling or quantize.

Figures (PDF + PNG at 300 dpi) are written next to the results file unless --out is given.
"""

from pathlib import Path

from experiments._cli import Parser, publish, run
from sw_lens import figures
from sw_lens.results import check_writable, read_json

DRAW = {
    "explain": figures.decomposition_figure,
    "robustness": figures.robustness_figure,
    "controls": figures.controls_figure,
    "restore": figures.restore_figure,
    "stopwords": figures.stopwords_figure,
    "scaling": figures.scaling_figure,
    "quantize": figures.quantize_figure,
}


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("results", type=Path, help="a results JSON file written by experiments/")
    p.add_argument("--out", type=Path, help="output directory (default: the results' folder)")
    p.add_argument("--linear", action="store_true", help="linear y axis for the per-layer plots")
    args = p.parse_args()
    out = check_writable(args.out or args.results.parent)
    document = read_json(args.results, kind={"locate", *DRAW})
    if document["kind"] == "locate":
        paths = publish(out, lambda folder: figures.render_all(document, folder, not args.linear))
    else:
        paths = publish(out, lambda folder: DRAW[document["kind"]](document, folder))
    for path in paths:
        print(path)


if __name__ == "__main__":
    run(main)
