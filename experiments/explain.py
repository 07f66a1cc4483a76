"""Is each spike the rule finds made by one weight? Decompose the down-projection output
at every candidate's token and channel into its per-weight products (plus the bias),
check whether later layers re-create it with the weight zeroed, and say which holds.
Writes explain.json and a cumulative-share figure.
"""

from experiments._cli import Parser, add_out, check_interrupted, output_dir, run, save_results
from sw_lens.figures import decomposition_figure
from sw_lens.options import add_options, from_args
from sw_lens.setup import LocateConfig
from sw_lens.studies import EXPLAIN, explain_study


def main() -> None:
    p = Parser(description=__doc__)
    add_options(p, LocateConfig, EXPLAIN)
    add_out(p)
    args = p.parse_args()
    output_dir(args)
    document = explain_study(from_args(LocateConfig, args))
    check_interrupted()
    for d in document.decompositions:
        print(f"{d.explanation}\n")
    if not document.decompositions:
        print("no spike met the criterion: nothing to decompose")
    save_results(args, "explain", document, decomposition_figure)


if __name__ == "__main__":
    run(main)
