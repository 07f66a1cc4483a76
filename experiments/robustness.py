"""Is a super weight the model's or one prompt's? Scan many texts one by one (the paper's
prompt and sentences of the corpus), apply the locate rule to each, and report per weight
in how many texts the rule names it (and in how many of those it makes the text's largest
spike over all layers), its super activation over texts, and the kinds of token it fires
on (BOS, first token, delimiter, other). Writes robustness.json and a figure.
"""

from experiments._cli import (
    Parser,
    add_out,
    check_interrupted,
    output_dir,
    run,
    save_results,
)
from sw_lens.figures import robustness_figure
from sw_lens.options import add_options, from_args
from sw_lens.setup import LocateConfig
from sw_lens.studies import ROBUSTNESS, RobustnessOptions, robustness_study


def print_report(document: dict) -> None:
    print(
        f"\n{document['model']['name']}: {document['n_texts']} texts scanned one by one "
        f"({'BOS prepended' if document['prepend_bos'] else 'no BOS'})"
    )
    print(
        f"{'weight (HF down_proj.weight)':<28} {'by rule':>10} {'top spike':>10} "
        f"{'median |w*post|':>15} {'max |w*post|':>12} {'max |row|':>10}  "
        f"fires on (where named)     flags"
    )
    for r in document["weights"]:
        kinds = ", ".join(f"{k} {n}" for k, n in r["kinds"].items() if n) or "-"
        n, weight = r["n_texts"], f"layer {r['layer']} [{r['row']}, {r['col']}]"
        print(
            f"{weight:<28} "
            f"{r['n_rule']:>4}/{n:<5} {r['n_top']:>4}/{n:<5} {r['median_contribution']:>15.4g} "
            f"{r['max_contribution']:>12.4g} {r['max_activation']:>10.4g}  {kinds:<26} "
            f"{'; '.join(r['flags'])}"
        )
    if not document["weights"]:
        print("  no weight met the criterion on any text")


def main() -> None:
    p = Parser(description=__doc__)
    add_options(p, LocateConfig, ROBUSTNESS, helps={"weight": "also report this weight"})
    add_options(p, RobustnessOptions)
    add_out(p)
    args = p.parse_args()
    output_dir(args)
    options = from_args(RobustnessOptions, args)
    document = robustness_study(from_args(LocateConfig, args), options)
    check_interrupted()
    print_report(document)
    save_results(args, "robustness", document, robustness_figure)


if __name__ == "__main__":
    run(main)
