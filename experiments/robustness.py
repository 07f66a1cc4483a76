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
from sw_lens.summaries import robustness_summary


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
    print(robustness_summary(document))
    save_results(args, "robustness", document, robustness_figure)


if __name__ == "__main__":
    run(main)
