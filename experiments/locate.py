"""Find the super weights of a causal LM and measure what zeroing them does to perplexity.

With no arguments: the embedded SmolLM2-135M-Instruct on the embedded Lee corpus,
offline, on CPU in about a minute. Writes results.json and every figure into --out.
"""

from experiments._cli import Parser, add_out, check_interrupted, output_dir, run, save_results
from sw_lens.figures import render_all
from sw_lens.locate_job import run_locate
from sw_lens.options import add_options, from_args
from sw_lens.setup import LocateConfig
from sw_lens.summaries import locate_summary


def main() -> None:
    p = Parser(description=__doc__)
    add_options(p, LocateConfig)
    add_out(p)
    args = p.parse_args()
    output_dir(args)  # an unwritable --out fails now, not after the work
    doc = run_locate(from_args(LocateConfig, args))
    check_interrupted()
    print(locate_summary(doc))
    save_results(args, "results", doc, render_all)


if __name__ == "__main__":
    run(main)
