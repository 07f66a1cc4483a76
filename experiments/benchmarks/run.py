"""Run every benchmark on one model and print the tables (Markdown).

Default: the embedded SmolLM2-135M on the Lee corpus, on CPU. --tiny uses a small random
Llama-shaped model instead: the CI smoke run, whose ratios mean nothing.
"""

import tempfile
from pathlib import Path

import torch
from bench import byte_tokenizer, pass_parser, prefix_reuse, scan_memory, table, throughput
from transformers import AutoModelForCausalLM

from experiments._cli import run
from sw_lens.corpora import load_corpus, tokenize
from sw_lens.models import load_model
from sw_lens.perplexity import Protocol
from sw_lens.vocabulary import WeightCoord


def tiny_model(directory: Path) -> str:
    """A random 4-layer Llama with a byte-level tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    byte_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def report(bridge, reference, tokens, protocol, coord, scan_tokens, k, repeats) -> str:
    parts = []
    rows = throughput(bridge, reference, tokens, protocol, coord, repeats)
    parts.append(
        table(
            f"Perplexity throughput ({protocol.describe()}, batch {protocol.batch_size}, "
            f"{bridge.cfg.dtype}, median of {repeats} interleaved passes)",
            ["path", "tokens/s", "x reference"],
            [[name, f"{tps:.1f}", f"{ratio:.3f}"] for name, tps, ratio in rows],
        )
    )
    mem, one_post = scan_memory(bridge, scan_tokens)
    parts.append(
        table(
            f"Scan memory, {len(scan_tokens)} tokens (peak above the loaded model; one layer's "
            f"hook_post = {one_post / 2**20:.1f} MiB)",
            ["method", "peak MiB", "x one hook_post"],
            [[name, f"{peak / 2**20:.1f}", f"{ratio:.2f}"] for name, peak, ratio in mem],
        )
    )
    sweep = prefix_reuse(bridge, tokens, protocol, coord.layer, k, repeats=1)
    parts.append(
        table(
            f"Prefix reuse: K={sweep['k']} ablations in layer {sweep['layer']} of "
            f"{sweep['n_layers']}, in single-pass equivalents",
            ["naive loop", "sweep", "predicted 1 + K(n-L)/n", "saving"],
            [
                [
                    f"{sweep['naive_passes']:.2f}",
                    f"{sweep['sweep_passes']:.2f}",
                    f"{sweep['predicted_sweep_passes']:.2f}",
                    f"{sweep['saving']:.2f}x",
                ]
            ],
        )
    )
    return "\n".join(parts)


def main() -> None:
    p = pass_parser(__doc__)
    p.add_argument("--layer", type=int, default=11, help="layer of the ablated weights")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        name = tiny_model(Path(tmp)) if args.tiny else args.model
        if args.tiny:
            args.window, args.tokens, args.layer = 64, 512, 2
        loaded = load_model(name, device=args.device)
        reference = (
            AutoModelForCausalLM.from_pretrained(
                loaded.location, dtype=loaded.dtype, attn_implementation="sdpa"
            )
            .to(loaded.device)
            .eval()
        )
        tokens = tokenize(loaded.tokenizer, load_corpus("lee").text, loaded.bridge.cfg.d_vocab)
        protocol = Protocol(args.window, None, False, args.tokens, args.batch_size)
        coord = WeightCoord(args.layer, 0, 0)
        scan_tokens = tokens[: 4 * args.window]
        print(f"model {name} on {loaded.device}, torch threads {torch.get_num_threads()}")
        print(
            report(
                loaded.bridge,
                reference,
                tokens,
                protocol,
                coord,
                scan_tokens,
                k=2 if args.tiny else 8,
                repeats=1 if args.tiny else args.repeats,
            )
        )


if __name__ == "__main__":
    run(main)
