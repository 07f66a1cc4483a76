"""Perplexity as the super weights are multiplied by factors from 0 to 3 (the paper finds
that factors of 0.8-2.0 can help slightly), and next-word accuracy on corpus sentences
with the last word held out (top-1 next token = the word's first token, as LAMBADA
scores). One sweep: the layers before the super weight run once per window for all
factors. Writes scaling.json and a figure.
"""

from experiments._cli import experiment, print_header, run, save_results
from sw_lens.figures import scaling_figure
from sw_lens.studies import ScalingOptions, scaling_study


def main() -> None:
    args, prepared, options = experiment(__doc__, ScalingOptions, streamable=True)
    document = scaling_study(prepared, options)
    print_header(document, document.baseline)
    task, baseline = document.task, document.baseline.perplexity
    if task:
        print(f"next-word accuracy on {task.n_prompts} {task.source}, last word held out")
    for point in document.scaling:
        accuracy = point.accuracy and (
            f"  accuracy {point.accuracy.share:.1%} ({point.accuracy.correct}/{task.n_prompts})"
        )
        print(
            f"  x{point.scale:<6g} {point.perplexity:>10.3f}  "
            f"(x{point.perplexity / baseline:.4f} of baseline){accuracy or ''}"
        )
    save_results(args, "scaling", document, scaling_figure)


if __name__ == "__main__":
    run(main)
