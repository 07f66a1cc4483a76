"""Find the super weights of a causal LM and measure what zeroing them does to perplexity.

With no arguments: the embedded SmolLM2-135M-Instruct on the embedded Lee corpus,
offline, on CPU in a few minutes. Writes results.json and the two per-layer plots into
--out.
"""

import argparse
from pathlib import Path

from _cli import run

from sw_lens.corpora import DEFAULT_CORPUS, NAMED
from sw_lens.figures import render_all
from sw_lens.locate import Criterion
from sw_lens.models import DEFAULT_MODEL, DTYPES, EMBEDDED
from sw_lens.patching import WeightCoord
from sw_lens.pipeline import PAPER_PROMPT, LocateConfig, run_locate
from sw_lens.results import write_json


def weight_coord(text: str) -> WeightCoord:
    try:
        layer, row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER,ROW,COL integers, got {text!r}") from None
    return WeightCoord(layer, row, col)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id (e.g. gpt2, Qwen/Qwen2.5-3B; HF cache works offline), HF-format "
        f"directory, .gguf file, or embedded: {', '.join(EMBEDDED)}",
    )
    p.add_argument(
        "--text",
        default=DEFAULT_CORPUS,
        help=f"perplexity corpus: a UTF-8 file or one of {', '.join(NAMED)}",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help=f"text to scan for spikes; repeat for several (default: {PAPER_PROMPT!r})",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--max-tokens", type=int, default=4096, help="corpus tokens for perplexity")
    p.add_argument("--rank-tokens", type=int, default=1024, help="corpus tokens per effect ranking")
    p.add_argument("--window", type=int, default=512, help="tokens per window, BOS included")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: non-overlapping)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        default="auto",
        choices=["auto", "yes", "no"],
        help="prepend BOS (auto: as the tokenizer does)",
    )
    p.add_argument("--iterations", type=int, default=5, help="maximum scans (ablate, rescan)")
    p.add_argument(
        "--threshold", type=float, default=Criterion.min_abs, help="min |activation| of a spike"
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=Criterion.min_ratio,
        help="min spike / median over layers of the same hook's spike",
    )
    p.add_argument(
        "--min-ppl-ratio",
        type=float,
        default=Criterion.min_ppl_ratio,
        help="perplexity ratio (zeroed alone / baseline) to call a weight super",
    )
    p.add_argument(
        "--weight",
        action="append",
        type=weight_coord,
        default=[],
        metavar="LAYER,ROW,COL",
        help="also zero this HF down_proj.weight[ROW, COL] (e.g. a published super weight)",
    )
    p.add_argument("--out", type=Path, help="output directory (default: out/<model>)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.max_tokens <= 0 or args.rank_tokens <= 0:
        p.error("--max-tokens and --rank-tokens must be positive")
    if args.iterations <= 0:
        p.error("--iterations must be positive")
    return args


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
        print(
            f"  layer {c['layer']:>2} down_proj.weight[{c['row']}, {c['col']}] = {c['value']:+.4f}"
            f"  (W_out[{c['layer']}][{c['col']}, {c['row']}]; iteration {c['iteration']}, "
            f"{c['role']}, token {c['token']!r})  ppl x{c['effect']:.3f}  {verdict}"
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
    if doc["predictions"]:
        pred = doc["predictions"]
        print(f"\nnext token after {pred['prompt']!r}, before -> after {pred['label']} zeroed:")
        for b, a in zip(pred["before"], pred["after"], strict=True):
            print(f"  {b['token']!r:>14} {b['prob']:6.1%}    {a['token']!r:>14} {a['prob']:6.1%}")


def main() -> None:
    args = parse_args()
    config = LocateConfig(
        model=args.model,
        text=args.text,
        prompts=args.prompt or [PAPER_PROMPT],
        device=args.device,
        dtype=args.dtype,
        window=args.window,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        rank_tokens=args.rank_tokens,
        bos=args.bos,
        iterations=args.iterations,
        criterion=Criterion(args.threshold, args.min_ratio, args.min_ppl_ratio),
        weights=args.weight,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )
    doc = run_locate(config)
    print_report(doc)
    out = args.out or Path("out") / Path(args.model).name
    path = write_json(out / "results.json", doc)
    figures = render_all(doc, out)
    print(f"\nwrote {path} and {len(figures)} figure files in {out}")


if __name__ == "__main__":
    run(main)
