"""Find the super weights of a causal LM and measure what zeroing them does to perplexity.

With no arguments: the embedded SmolLM2-135M-Instruct on the embedded Lee corpus,
offline, on CPU in about a minute. Writes results.json and every figure into --out.
"""

from experiments._cli import Parser, add_out, check_interrupted, output_dir, run, save_results
from sw_lens.figures import render_all
from sw_lens.locate_job import run_locate
from sw_lens.options import add_options, from_args
from sw_lens.setup import LocateConfig


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
    if doc["search"]:
        print_search(doc["search"])
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


def print_search(search: dict) -> None:
    p, rank = search["parameters"], search["ranking"]
    print(
        f"\nsearch: {search['n_measured']} weights zeroed alone ({rank['n_tokens']} tokens): "
        f"the top {p['search_k']} by largest contribution and by saliency "
        f"({search['screen_overlap']} in both), the rule's candidates, a walk down the "
        f"contribution ranking to rank {search['stop_rank']} ({search['stop_reason']}), and "
        f"{p['recall_sample']} random weights beyond it (largest x{search['sample_max']:.3f})"
    )
    for warning in search["warnings"]:
        print(f"  WARNING: {warning}")
    print(f"  {search['verdict']}")
    for m in search["measured"]:
        if m["is_super"]:
            saliency = m["saliency_rank"] or "-"
            print(
                f"  layer {m['layer']:>2} down_proj.weight[{m['row']}, {m['col']}]  "
                f"x{m['confirmed_effect']:.3f}  contribution rank {m['contribution_rank']}, "
                f"saliency rank {saliency}; found by {', '.join(m['found_by'])}"
            )
    for m in search["missed_by_screens"]:
        print(
            f"  FINDING: layer {m['layer']} [{m['row']}, {m['col']}] matters but neither screen "
            f"ranked it in its top {p['search_k']} (found by {', '.join(m['found_by'])})"
        )
    recall = search["rule_recall"]
    if recall["of"]:
        print(f"  the spike rule alone finds {recall['found']} of these {recall['of']}")
    if search["ranking_noise"] is not None:
        print(
            f"  ranking noise: a confirmed effect moved by up to "
            f"{search['ranking_noise']:.1%} between the ranking and the reported budget"
        )


def main() -> None:
    p = Parser(description=__doc__)
    add_options(p, LocateConfig)
    add_out(p)
    args = p.parse_args()
    output_dir(args)  # an unwritable --out fails now, not after the work
    doc = run_locate(from_args(LocateConfig, args))
    check_interrupted()
    print_report(doc)
    save_results(args, "results", doc, render_all)


if __name__ == "__main__":
    run(main)
