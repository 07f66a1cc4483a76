"""Layer-streamed perplexity and scan (`sw_lens.stream`) against the in-memory paths, on
the same tokens in one process: throughput as a ratio, and peak memory as a multiple of
what streaming must hold (one decoder layer, the residual stream of every token, one
batch's activations).

Default: the embedded SmolLM2-135M, streamed from the safetensors snapshot sw_lens keeps of
it (just read by the in-memory load, so its pages are in the page cache), on CPU.
--tiny: a small random Llama (the CI smoke run; its ratios mean nothing).
"""

import tempfile
from pathlib import Path

import torch
from bench import interleaved, pass_parser, peak_resident, table
from run import tiny_model

from experiments._cli import run
from sw_lens.corpora import load_corpus, tokenize
from sw_lens.models import load_model
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.scan import scan
from sw_lens.stream import StreamedModel, evaluate_streamed, scan_streamed


def main() -> None:
    args = pass_parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(tiny_model(Path(tmp)) if args.tiny else args.model, args.device)
        if args.tiny:
            args.window, args.tokens, args.repeats = 64, 256, 1
        bridge, device = loaded.bridge, torch.device(args.device)
        model = StreamedModel(Path(loaded.location), loaded.tokenizer, device, loaded.dtype)
        tokens = tokenize(loaded.tokenizer, load_corpus("lee").text, bridge.cfg.d_vocab)
        tokens = tokens[: args.tokens]
        protocol = Protocol(args.window, None, False, None, args.batch_size)
        texts = [tokens[: args.window]]
        seconds = interleaved(
            {
                "in memory: evaluate": lambda: evaluate(bridge, tokens, protocol, "bench"),
                "streamed: evaluate_streamed": lambda: evaluate_streamed(
                    model, tokens, protocol, "bench"
                ),
                "in memory: scan": lambda: scan(bridge, texts, False),
                "streamed: scan_streamed": lambda: scan_streamed(model, texts, False),
            },
            device,
            args.repeats,
        )
        memory = {
            "streamed perplexity": peak_resident(
                lambda: evaluate_streamed(model, tokens, protocol, "bench"), device
            ),
            "streamed scan": peak_resident(lambda: scan_streamed(model, texts, False), device),
        }
    n_tokens, itemsize = len(tokens), model.itemsize()
    d_model = model.config.get_text_config().hidden_size
    layer, residual = model.layer_bytes(), n_tokens * d_model * itemsize
    # One window's activations, as an in-memory forward holds them: its logits over the
    # whole vocabulary, or the MLP's three d_mlp-wide tensors, whichever is larger.
    window = args.batch_size * args.window * max(3 * model.d_mlp(), model.d_vocab) * 4
    unit = layer + residual + window
    whole = model.n_layers * layer + model.other_bytes()
    mib = 2**20
    print(f"model {'tiny' if args.tiny else args.model} on {device}, {loaded.dtype}")
    print(
        table(
            f"Streamed vs in-memory ({n_tokens} tokens, {protocol.describe()}, batch "
            f"{args.batch_size}, median of {args.repeats} interleaved runs)",
            ["path", "seconds"],
            [[name, f"{s:.2f}"] for name, s in seconds.items()],
        )
    )
    ppl = seconds["in memory: evaluate"] / seconds["streamed: evaluate_streamed"]
    scanned = seconds["in memory: scan"] / seconds["streamed: scan_streamed"]
    print(f"\nstreamed throughput / in-memory: perplexity {ppl:.2f}x, scan {scanned:.2f}x")
    print(
        table(
            f"Streamed peak memory above the resident embeddings and norms "
            f"({model.other_bytes() / mib:.1f} MiB; the whole model is {whole / mib:.1f} MiB); "
            f"unit = one layer ({layer / mib:.1f} MiB) + residuals ({residual / mib:.1f} MiB) "
            f"+ one window's activations, its logits ({window / mib:.1f} MiB) = "
            f"{unit / mib:.1f} MiB",
            ["run", "peak MiB", "x unit"],
            [[name, f"{b / mib:.1f}", f"{b / unit:.2f}"] for name, b in memory.items()],
        )
    )


if __name__ == "__main__":
    run(main)
