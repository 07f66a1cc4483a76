"""Regenerate every figure of a locate run from its results.json, without the model.

Figures (PDF + PNG at 300 dpi) and the token-loss HTML page are written next to the
results file unless --out is given.
"""

import argparse
from pathlib import Path

from _cli import run

from sw_lens.figures import render_all
from sw_lens.results import read_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path, help="results.json written by experiments/locate.py")
    p.add_argument("--out", type=Path, help="output directory (default: the results' folder)")
    p.add_argument("--linear", action="store_true", help="linear y axis for the per-layer plots")
    args = p.parse_args()
    document = read_json(args.results, kind="locate")
    paths = render_all(document, args.out or args.results.parent, log_scale=not args.linear)
    for path in paths:
        print(path)


if __name__ == "__main__":
    run(main)
