"""Is a super weight the model's or one prompt's? Scan many texts one by one (the paper's
prompt and sentences of the corpus), apply the locate rule to each, and report per weight
in how many texts the rule names it (and in how many of those it makes the text's largest
spike over all layers), its super activation over texts, and the kinds of token it fires
on (BOS, first token, delimiter, other). Writes robustness.json and a figure.
"""

import argparse
from dataclasses import asdict
from pathlib import Path

from _cli import (
    Parser,
    add_loading_args,
    add_rule_args,
    add_weight_arg,
    check_interrupted,
    criterion,
    positive_int,
    run,
    save_results,
)

from sw_lens.corpora import DEFAULT_CORPUS, NAMED, load_corpus, sentences
from sw_lens.figures import robustness_figure
from sw_lens.models import DEFAULT_MODEL, load_model
from sw_lens.results import SCHEMA_VERSION, provenance
from sw_lens.robustness import robustness
from sw_lens.setup import PAPER_PROMPT, prompt_tokens, resolve_bos


def parse_args() -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--text", default=DEFAULT_CORPUS, help=f"sentences from: a file or {', '.join(NAMED)}"
    )
    p.add_argument("--n-texts", type=positive_int, default=100, help="sentences of --text")
    p.add_argument(
        "--prompt",
        action="append",
        help=f"also scan this text; repeatable; none given: {PAPER_PROMPT!r}",
    )
    p.add_argument(
        "--bos", default="auto", choices=["auto", "yes", "no"], help="prepend BOS to each text"
    )
    add_weight_arg(p, "also report this weight")
    add_loading_args(p)
    add_rule_args(p)
    p.add_argument("--out", type=Path, help="output directory (default: out/<model>)")
    return p.parse_args()


def print_report(document: dict) -> None:
    print(
        f"\n{document['model']['name']}: {document['n_texts']} texts scanned one by one "
        f"({'BOS prepended' if document['prepend_bos'] else 'no BOS'})"
    )
    print(
        f"{'weight (HF down_proj.weight)':<28} {'by rule':>10} {'top spike':>10} "
        f"{'median |act|':>12} {'max |act|':>10}  fires on (where named)     flags"
    )
    for r in document["weights"]:
        kinds = ", ".join(f"{k} {n}" for k, n in r["kinds"].items() if n) or "-"
        n, weight = r["n_texts"], f"layer {r['layer']} [{r['row']}, {r['col']}]"
        print(
            f"{weight:<28} "
            f"{r['n_rule']:>4}/{n:<5} {r['n_top']:>4}/{n:<5} {r['median_activation']:>12.4g} "
            f"{r['max_activation']:>10.4g}  {kinds:<26} {'; '.join(r['flags'])}"
        )
    if not document["weights"]:
        print("  no weight met the criterion on any text")


def main() -> None:
    args = parse_args()
    loaded = load_model(args.model, args.device, args.dtype, tokenizer_name=args.tokenizer)
    prepend_bos = resolve_bos(args.bos, loaded)
    texts = (args.prompt or [PAPER_PROMPT]) + sentences(load_corpus(args.text).text, args.n_texts)
    ids = prompt_tokens(loaded, texts, prepend_bos)
    report = robustness(loaded.bridge, ids, prepend_bos, criterion(args), args.weight)
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": "robustness",
        "model": loaded.description(),
        "texts": texts,
        "n_texts": len(texts),
        "prepend_bos": prepend_bos,
        "criterion": asdict(criterion(args)) | {"description": criterion(args).describe()},
        "weights": [asdict(r) for r in report],
        "provenance": provenance(loaded.device, loaded.dtype, 0),
    }
    check_interrupted()
    print_report(document)
    save_results(args, "robustness", document, robustness_figure)


if __name__ == "__main__":
    run(main)
