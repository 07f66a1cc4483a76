"""Regenerate the figures of any sw_lens results file, without the model: a locate run's
results.json (every figure and the token-loss page), or the JSON of any other command
(explain, robustness, controls, restore, stopwords, scaling, quantize, circuit, track).

Figures (PDF + PNG at 300 dpi) are written next to the results file unless --out is given.
"""

from pathlib import Path

from experiments._cli import Parser, publish, run
from sw_lens import figures
from sw_lens.documents import KINDS
from sw_lens.results import check_writable, read_json


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("results", type=Path, help="a results JSON file written by experiments/")
    p.add_argument("--out", type=Path, help="output directory (default: the results' folder)")
    p.add_argument("--linear", action="store_true", help="linear y axis for the per-layer plots")
    args = p.parse_args()
    out = check_writable(args.out or args.results.parent)
    document = read_json(args.results, kind=set(KINDS))
    if document.kind == "locate":
        paths = publish(out, lambda folder: figures.render_all(document, folder, not args.linear))
    else:
        draw = getattr(figures, KINDS[document.kind].figure)
        paths = publish(out, lambda folder: draw(document, folder))
    for path in paths:
        print(path)


if __name__ == "__main__":
    run(main)
