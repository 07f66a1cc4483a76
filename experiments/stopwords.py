"""Does zeroing the super weights shift next-token probability towards stopwords? On a
set of prompts (corpus sentences with their last word held out, or LAMBADA through
`datasets`), the mean next-token probability mass on stopwords, other words and the
rest, before and after, with the after/before ratio per class; and the top-5 predictions
on the paper's case-study prompt. Writes stopwords.json and a figure.
"""

from experiments._cli import experiment, print_header, run, save_results
from sw_lens.figures import stopwords_figure
from sw_lens.studies import StopwordsOptions, stopwords_study


def main() -> None:
    args, prepared, options = experiment(
        __doc__, StopwordsOptions, {"max_tokens": 1024}, streamable=True
    )
    document = stopwords_study(prepared, options)
    print_header(document)
    print(
        f"{document.n_prompts} prompts ({document.prompt_source}); stopwords: "
        f"{document.stopword_list}"
    )
    print(f"  {'class':<10} {'tokens':>7} {'before':>8} {'after':>8} {'after/before':>13}")
    for name, c in document.classes.items():
        ratio = f"x{c.ratio:.2f}" if c.ratio else "-"
        print(
            f"  {name:<10} {document.class_sizes[name]:>7} {c.before:>8.1%} "
            f"{c.after:>8.1%} {ratio:>13}"
        )
    case_study = document.case_study
    print(f"\nnext token after {case_study.prompt!r}, before -> after:")
    for b, a in zip(case_study.before, case_study.after, strict=True):
        print(f"  {b.token!r:>14} {b.prob:6.1%}    {a.token!r:>14} {a.prob:6.1%}")
    save_results(args, "stopwords", document, stopwords_figure)


if __name__ == "__main__":
    run(main)
