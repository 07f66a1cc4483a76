"""Does zeroing the super weights shift next-token probability towards stopwords? On a
set of prompts (corpus sentences with their last word held out, or LAMBADA through
`datasets`), the mean next-token probability mass on stopwords, other words and the
rest, before and after, with the after/before ratio per class; and the top-5 predictions
on the paper's case-study prompt. Writes stopwords.json and a figure.
"""

from _cli import (
    experiment_parser,
    experiment_setup,
    positive_int,
    print_header,
    run,
    save_results,
)

from sw_lens.corpora import sentences
from sw_lens.experiment import experiment_document
from sw_lens.figures import stopwords_figure
from sw_lens.patching import ablation_hooks
from sw_lens.predictions import CASE_STUDY_PROMPT, top_predictions
from sw_lens.setup import prompt_tokens
from sw_lens.stopwords import (
    STOPWORD_SOURCE,
    class_mass,
    lambada,
    last_word_contexts,
    token_classes,
)


def main() -> None:
    p = experiment_parser(__doc__, max_tokens=1024)
    p.add_argument(
        "--prompts",
        choices=["corpus", "lambada"],
        default="corpus",
        help="sentences of --text with the last word held out, or LAMBADA (needs the hub "
        "or a datasets cache)",
    )
    p.add_argument("--n-prompts", type=positive_int, default=100)
    p.add_argument("--case-study", default=CASE_STUDY_PROMPT, help="prompt for the top-5 table")
    args = p.parse_args()
    config, setup, coords, source = experiment_setup(args)
    if args.prompts == "lambada":
        pairs, prompt_source = lambada(args.n_prompts), "LAMBADA (OpenAI) test"
    else:
        pairs = last_word_contexts(sentences(setup.corpus.text, args.n_prompts))
        prompt_source = f"{setup.corpus.name} sentences, last word held out"
    contexts = prompt_tokens(setup.loaded, [c for c, _ in pairs], setup.prepend_bos)
    classes = token_classes(setup.loaded.tokenizer, setup.model.cfg.d_vocab)
    mass = class_mass(setup.model, contexts, classes, coords)
    case = prompt_tokens(setup.loaded, [args.case_study], setup.prepend_bos)[0]
    document = experiment_document("stopwords", setup, config, coords, source) | {
        "stopword_list": STOPWORD_SOURCE,
        "prompt_source": prompt_source,
        "n_prompts": len(pairs),
        "classes": mass.summary(),
        "class_sizes": {name: int((classes == i).sum()) for i, name in enumerate(mass.summary())},
        "case_study": {
            "prompt": args.case_study,
            "before": top_predictions(setup.model, case),
            "after": top_predictions(
                setup.model, case, fwd_hooks=ablation_hooks(setup.model, coords)
            ),
        },
    }
    print_header(document)
    print(f"{len(pairs)} prompts ({prompt_source}); stopwords: {STOPWORD_SOURCE}")
    print(f"  {'class':<10} {'tokens':>7} {'before':>8} {'after':>8} {'after/before':>13}")
    for name, c in document["classes"].items():
        ratio = f"x{c['ratio']:.2f}" if c["ratio"] else "-"
        print(
            f"  {name:<10} {document['class_sizes'][name]:>7} {c['before']:>8.1%} "
            f"{c['after']:>8.1%} {ratio:>13}"
        )
    case_study = document["case_study"]
    print(f"\nnext token after {case_study['prompt']!r}, before -> after:")
    for b, a in zip(case_study["before"], case_study["after"], strict=True):
        print(f"  {b['token']!r:>14} {b['prob']:6.1%}    {a['token']!r:>14} {a['prob']:6.1%}")
    save_results(args, "stopwords", document, stopwords_figure)


if __name__ == "__main__":
    run(main)
