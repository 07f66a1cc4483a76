"""One short GPU check: Qwen2.5-3B's architecture from its published config, random
weights (no download: speed does not depend on the weights), bfloat16 on CUDA.

Reports tokens/s of sw_lens perplexity against the bare HF model at window 2048, the
scan's peak memory against the model's, the prefix-reuse saving, and one correctness
line (hook ablation against the direct weight edit, max logit difference). Finishes in
a few minutes on one H100. --tiny runs a scaled-down config on CPU (the CI smoke test).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench import (
    byte_tokenizer,
    hook_vs_edit,
    prefix_reuse,
    scan_memory,
    table,
    throughput,
)

from experiments._cli import run
from sw_lens.fast import hf_twin
from sw_lens.perplexity import Protocol, evaluate
from sw_lens.vocabulary import WeightCoord

# Qwen/Qwen2.5-3B config.json, as published.
QWEN25_3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
TINY = dict(
    QWEN25_3B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
)
REPORTED = WeightCoord(layer=2, row=318, col=3189)  # the original project's Qwen2.5-3B claim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="a scaled-down config on CPU")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="tokens per throughput pass")
    args = p.parse_args()
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    window = 64 if args.tiny else 2048
    n_tokens = 4 * window if args.tiny else args.tokens
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_3B))
    start = time.perf_counter()
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"  # the bare HF model's default kernel
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
        reference = Qwen2ForCausalLM(config).to(dtype).eval()
    assert reference.config._attn_implementation == "sdpa"
    reference.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        bridge = TransformerBridge.boot_transformers(
            "Qwen/Qwen2.5-3B (random weights)",
            hf_model=model,
            tokenizer=byte_tokenizer(Path(tmp)),
            device=device,
            dtype=dtype,
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# gpu_check on {name}, {dtype}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"parameters, built in {time.perf_counter() - start:.0f} s"
    )
    tokens = torch.randint(0, 256, (n_tokens,))
    protocol = Protocol(window, None, False, n_tokens, 1)
    coord = WeightCoord(
        2, REPORTED.row % config.hidden_size, REPORTED.col % config.intermediate_size
    )
    rows = throughput(bridge, reference, tokens, protocol, coord, repeats=3)
    print(
        table(
            f"Perplexity throughput, window {window}, batch 1, {n_tokens} tokens",
            ["path", "tokens/s", "x reference"],
            [[n, f"{t:.0f}", f"{r:.3f}"] for n, t, r in rows],
        )
    )
    keep = [("hook_embed", lambda act, hook: act)]  # routes evaluate through the bridge
    fast = evaluate(bridge, tokens, protocol, "gpu").perplexity
    eager = evaluate(bridge, tokens, protocol, "gpu", fwd_hooks=keep).perplexity
    with torch.inference_mode():
        ids = tokens[:window][None].to(device)
        twin_vs_ref = (hf_twin(bridge)(ids).logits - reference(ids).logits).abs().max()
    print(
        f"\nsame function: perplexity fast path {fast:.4f} vs bridge {eager:.4f} "
        f"(rel. diff {abs(fast - eager) / eager:.2e}); twin vs reference model max |logit "
        f"diff| {float(twin_vs_ref):.3g} ({dtype})"
    )
    del reference
    mem, one_post = scan_memory(bridge, tokens[:window])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        table(
            f"Scan memory, {window} tokens; model {model_bytes / 2**30:.2f} GiB, one "
            f"hook_post {one_post / 2**20:.1f} MiB",
            ["method", "peak above model, MiB", "x one hook_post"],
            [[n, f"{b / 2**20:.1f}", f"{r:.2f}"] for n, b, r in mem],
        )
    )
    sweeps = [
        prefix_reuse(bridge, tokens[: 4 * window], protocol, layer, k=8, repeats=3)
        for layer in (coord.layer, config.num_hidden_layers // 2)
    ]
    print(
        table(
            "Prefix reuse, K=8 ablations in layer L (single-pass equivalents)",
            ["L", "naive loop", "sweep", "predicted 1 + K(n-L)/n", "saving"],
            [
                [
                    f"{w['layer']} of {w['n_layers']}",
                    f"{w['naive_passes']:.2f}",
                    f"{w['sweep_passes']:.2f}",
                    f"{w['predicted_sweep_passes']:.2f}",
                    f"{w['saving']:.2f}x",
                ]
                for w in sweeps
            ],
        )
    )
    for precision in (dtype, torch.float32):
        model.to(precision)
        diff = hook_vs_edit(bridge, tokens[:window], coord)
        print(
            f"\ncorrectness: hook ablation vs direct edit of {coord}, max |logit diff| = "
            f"{diff:.3g} in {precision}"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run(main)
