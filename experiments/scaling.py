"""Perplexity as the super weights are multiplied by factors from 0 to 3 (the paper finds
that factors of 0.8-2.0 can help slightly), and next-word accuracy on corpus sentences
with the last word held out (top-1 next token = the word's first token, as LAMBADA
scores). One sweep: the layers before the super weight run once per window for all
factors. Writes scaling.json and a figure.
"""

from _cli import (
    experiment_parser,
    experiment_setup,
    float_list,
    non_negative_int,
    print_header,
    run,
    save_results,
)

from sw_lens.corpora import sentences, tokenize
from sw_lens.experiment import experiment_document
from sw_lens.figures import scaling_figure
from sw_lens.perplexity import evaluate_sweep
from sw_lens.predictions import next_word_accuracy
from sw_lens.setup import prompt_tokens
from sw_lens.stopwords import last_word_contexts

FACTORS = [0.0, 0.25, 0.5, 0.75, 0.8, 0.9, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0]


def main() -> None:
    p = experiment_parser(__doc__, max_tokens=4096)
    p.add_argument("--factors", type=float_list, default=FACTORS, help="comma-separated")
    p.add_argument(
        "--task-prompts",
        type=non_negative_int,
        default=100,
        help="sentences of --text for next-word accuracy (0: no accuracy)",
    )
    args = p.parse_args()
    config, setup, coords, source = experiment_setup(args)
    factors = [f for f in args.factors if f != 1.0]  # x1 is the baseline, measured anyway
    baseline, scaled = evaluate_sweep(
        setup.model,
        setup.tokens,
        setup.protocol,
        setup.corpus.name,
        [coords] * len(factors),
        scale=factors,
        desc="scaling",
    )
    points = [{"scale": 1.0, **baseline.to_dict()}] + [
        {"scale": factor, **result.to_dict()}
        for factor, result in zip(factors, scaled, strict=True)
    ]
    points.sort(key=lambda point: point["scale"])
    task = None
    if args.task_prompts > 0:
        pairs = last_word_contexts(sentences(setup.corpus.text, args.task_prompts))
        contexts = prompt_tokens(setup.loaded, [c for c, _ in pairs], setup.prepend_bos)
        targets = [int(tokenize(setup.loaded.tokenizer, " " + word)[0]) for _, word in pairs]
        for point in points:
            point["accuracy"] = next_word_accuracy(
                setup.model, contexts, targets, coords, point["scale"]
            )
        task = {
            "description": "next-word accuracy: the top-1 next token is the first token of "
            "the held-out last word",
            "source": f"{setup.corpus.name} sentences",
            "n_prompts": len(pairs),
        }
    document = experiment_document("scaling", setup, config, coords, source) | {
        "baseline": baseline.to_dict(),
        "scaling": points,
        "task": task,
    }
    print_header(document, document["baseline"])
    if task:
        print(f"next-word accuracy on {task['n_prompts']} {task['source']}, last word held out")
    for point in points:
        ratio = point["perplexity"] / baseline.perplexity
        accuracy = f"  accuracy {point['accuracy']:.1%}" if task else ""
        print(
            f"  x{point['scale']:<6g} {point['perplexity']:>10.3f}  (x{ratio:.4f} of baseline)"
            f"{accuracy}"
        )
    save_results(args, "scaling", document, scaling_figure)


if __name__ == "__main__":
    run(main)
