"""Is each spike the rule finds made by one weight? Decompose the down-projection output
at every candidate's token and channel into its per-weight products (plus the bias),
check whether later layers re-create it with the weight zeroed, and say which holds.
Writes explain.json and a cumulative-share figure.
"""

from dataclasses import asdict
from pathlib import Path

from _cli import (
    Parser,
    add_loading_args,
    add_rule_args,
    check_interrupted,
    criterion,
    run,
    save_results,
)

from sw_lens.decompose import decompose
from sw_lens.figures import decomposition_figure
from sw_lens.locate import locate
from sw_lens.models import DEFAULT_MODEL, load_model
from sw_lens.results import SCHEMA_VERSION, provenance
from sw_lens.setup import PAPER_PROMPT, prompt_tokens


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", default=PAPER_PROMPT)
    add_loading_args(p)
    add_rule_args(p)
    p.add_argument("--out", type=Path, help="output directory (default: out/<model>)")
    args = p.parse_args()
    loaded = load_model(args.model, args.device, args.dtype, tokenizer_name=args.tokenizer)
    ids = prompt_tokens(loaded, [args.prompt], loaded.adds_bos)[0]
    found = locate(loaded.bridge, [ids], loaded.adds_bos, criterion(args), args.iterations)
    decompositions = [
        decompose(loaded.bridge, ids, c.coord.layer, c.coord.row, c.mlp_out.pos)
        for c in found.candidates
    ]
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": "explain",
        "model": loaded.description(),
        "prompt": args.prompt,
        "decompositions": [asdict(d) for d in decompositions],
        "provenance": provenance(loaded.device, loaded.dtype, 0),
    }
    check_interrupted()
    for d in decompositions:
        print(f"{d.explanation}\n")
    if not decompositions:
        print("no spike met the criterion: nothing to decompose")
    save_results(args, "explain", document, decomposition_figure)


if __name__ == "__main__":
    run(main)
