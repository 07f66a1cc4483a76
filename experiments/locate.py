"""Find the super weights of a causal LM and measure what zeroing them does to perplexity.

With no arguments: the embedded SmolLM2-135M-Instruct on the embedded Lee corpus,
offline, on CPU in about a minute. Writes results.json and every figure into --out.
"""

import argparse
from dataclasses import replace

from _cli import (
    Parser,
    add_job_args,
    add_weight_arg,
    check_interrupted,
    locate_config,
    output_dir,
    run,
    save_results,
)

from sw_lens.figures import render_all
from sw_lens.locate_job import run_locate


def parse_args() -> argparse.Namespace:
    p = Parser(description=__doc__)
    add_job_args(p, max_tokens=4096)
    add_weight_arg(p, "also zero this weight (e.g. a published super weight)")
    p.add_argument(
        "--check-known",
        nargs="?",
        const="auto",
        metavar="NAME",
        help="compare with the registry of published super weights (by --model's name, or "
        "NAME, e.g. Qwen/Qwen2.5-3B for a local copy) and measure the published weights too",
    )
    p.add_argument("--registry", help="registry TOML file (default: sw_lens's own)")
    return p.parse_args()


def print_report(doc: dict) -> None:
    model, scan = doc["model"], doc["scan"]
    bos = "BOS prepended" if scan["prepend_bos"] else "no BOS prepended"
    print(
        f"\n{model['name']} ({model['architecture']}, {model['n_layers']} layers), "
        f"scan of {scan['n_tokens']} tokens, {bos}"
    )
    print(
        f"{'layer':>5}  {'max |hook_post|':>15} {'ch':>5} {'token':<12} "
        f"{'max |hook_mlp_out|':>18} {'ch':>5} {'token':<12}"
    )
    for s in scan["layers"]:
        post, out = s["post"], s["mlp_out"]
        flag = "  cancels" if s["cancels"] else ""
        print(
            f"{s['layer']:>5}  {abs(post['value']):>15.2f} {post['channel']:>5} "
            f"{post['token']!r:<12} {abs(out['value']):>18.2f} {out['channel']:>5} "
            f"{out['token']!r:<12}{flag}"
        )
    print(f"\ncriterion: {doc['criterion']['description']}")
    print(f"iterations: {doc['iterations']} ({doc['termination']})")
    for note in doc["notes"]:
        print(f"  note: {note}")
    rank = doc["ranking"]
    print(
        f"\ncandidates, ranked by perplexity when zeroed alone "
        f"({rank['corpus']}, {rank['n_tokens']} tokens, baseline {rank['perplexity']:.3f}):"
    )
    if not doc["candidates"]:
        print("  none: no layer met the criterion")
    for c in doc["candidates"]:
        verdict = "SUPER WEIGHT" if c["is_super"] else "no large effect"
        i, j = c["checkpoint_index"]
        print(
            f"  layer {c['layer']:>2} down_proj.weight[{c['row']}, {c['col']}] = {c['value']:+.4f}"
            f"  (W_out[{c['layer']}][{c['col']}, {c['row']}], {c['checkpoint_param']}[{i}, {j}]; "
            f"iteration {c['iteration']}, {c['role']}, token {c['token']!r})"
            f"  ppl x{c['effect']:.3f}  {verdict}"
        )
    ppl = doc["perplexity"]
    base = ppl["baseline"]
    print(
        f"\nperplexity on {base['corpus']}: {base['protocol_description']}, "
        f"{base['n_tokens']} tokens scored, {doc['provenance']['dtype']}"
    )
    print(f"  {'baseline':<45} {base['perplexity']:>10.3f}")
    for a in ppl["ablations"]:
        print(f"  {a['label'] + ' zeroed':<45} {a['perplexity']:>10.3f}  (x{a['ratio']:.3f})")
    if doc["known"]:
        known = doc["known"]
        entry = known["entry"] or "no entry for this model"
        print(f"\nknown coordinates ({entry}; registry convention {known['convention']}):")
        for check in known["checks"]:
            print(f"  {check['message']}")
    if doc["predictions"]:
        pred = doc["predictions"]
        print(f"\nnext token after {pred['prompt']!r}, before -> after {pred['label']} zeroed:")
        for b, a in zip(pred["before"], pred["after"], strict=True):
            print(f"  {b['token']!r:>14} {b['prob']:6.1%}    {a['token']!r:>14} {a['prob']:6.1%}")


def main() -> None:
    args = parse_args()
    output_dir(args)  # an unwritable --out fails now, not after the work
    config = replace(locate_config(args), check_known=args.check_known, registry=args.registry)
    doc = run_locate(config)
    check_interrupted()
    print_report(doc)
    save_results(args, "results", doc, render_all)


if __name__ == "__main__":
    run(main)
