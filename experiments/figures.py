"""Regenerate the figures of any sw_lens results file, without the model: a locate run's
results.json (every figure and the token-loss page), or the JSON of explain, robustness,
controls, restore, stopwords, scaling or quantize.

Figures (PDF + PNG at 300 dpi) are written next to the results file unless --out is given.
"""

import argparse
from pathlib import Path

from _cli import run

from sw_lens import figures
from sw_lens.results import read_json

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
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path, help="a results JSON file written by experiments/")
    p.add_argument("--out", type=Path, help="output directory (default: the results' folder)")
    p.add_argument("--linear", action="store_true", help="linear y axis for the per-layer plots")
    args = p.parse_args()
    document = read_json(args.results, kind={"locate", *DRAW})
    out = args.out or args.results.parent
    if document["kind"] == "locate":
        paths = figures.render_all(document, out, log_scale=not args.linear)
    else:
        paths = DRAW[document["kind"]](document, out)
    for path in paths:
        print(path)


if __name__ == "__main__":
    run(main)
