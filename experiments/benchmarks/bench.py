"""Measurements shared by the benchmark commands: each is a ratio in one process, on the
same tokens, against a baseline measured in the same run.

- throughput: sw_lens perplexity (baseline, and with a weight ablated) against the bare
  HF model computing the same loss with ``labels=`` and its default ``sdpa`` attention;
- scan memory: peak memory above the loaded model for the streaming scan, the
  layer-major scan, a bare forward and ``run_with_cache`` of every
  ``hook_post``/``hook_mlp_out``;
- prefix reuse: K ablations at layer L as one sweep against the naive loop.
"""

import argparse
import gc
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from sw_lens.fast import hf_twin
from sw_lens.layer_major import scan_layer_major
from sw_lens.patching import ablation_hooks
from sw_lens.perplexity import Protocol, evaluate, evaluate_sweep
from sw_lens.scan import scan
from sw_lens.vocabulary import WeightCoord, hook_mlp_out, hook_post


def byte_tokenizer(directory: Path):
    """A 257-token byte-level tokenizer, saved (the bridge reloads tokenizers from disk):
    benchmarks on random weights need any tokenizer, not a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], device, repeats: int = 3) -> dict[str, float]:
    """Median seconds of each, run in turn `repeats` times so drift hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bare_hf_loss(reference: PreTrainedModel, tokens: torch.Tensor, protocol: Protocol) -> None:
    """The bare model computing the same loss (non-overlapping windows, labels=)."""
    usable = len(tokens) // protocol.window * protocol.window
    batches = tokens[:usable].view(-1, protocol.window).split(protocol.batch_size)
    with torch.inference_mode():
        for batch in batches:
            batch = batch.to(reference.device)
            reference(batch, labels=batch).loss.item()


def bare_hf_logits_loss(reference, tokens: torch.Tensor, protocol: Protocol) -> None:
    """The bare model's logits with sw_lens's loss code: isolates the toolkit's overhead
    from the cost of HF's ``labels=`` loss path."""
    usable = len(tokens) // protocol.window * protocol.window
    batches = tokens[:usable].view(-1, protocol.window).split(protocol.batch_size)
    with torch.inference_mode():
        for batch in batches:
            batch = batch.to(reference.device)
            logits = reference(batch).logits[:, :-1]
            F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()


def throughput(bridge, reference, tokens, protocol: Protocol, coord: WeightCoord, repeats=3):
    """Tokens/s of each path and its ratio to the bare HF model."""
    tokens = tokens[: protocol.max_tokens]
    device = bridge.cfg.device
    keep = [("hook_embed", lambda act, hook: act)]  # forces the bridge path
    fns = {
        "HF model, sdpa (reference)": lambda: bare_hf_loss(reference, tokens, protocol),
        "HF model, sdpa, logits + F.cross_entropy": lambda: bare_hf_logits_loss(
            reference, tokens, protocol
        ),
        "sw_lens evaluate": lambda: evaluate(bridge, tokens, protocol, "bench"),
        "sw_lens evaluate, 1 weight zeroed": lambda: evaluate(
            bridge, tokens, protocol, "bench", [coord]
        ),
        "sw_lens via the bridge (eager)": lambda: evaluate(
            bridge, tokens, protocol, "bench", fwd_hooks=keep
        ),
    }
    seconds = interleaved(fns, device, repeats)
    ref = seconds["HF model, sdpa (reference)"]
    return [(name, len(tokens) / s, ref / s) for name, s in seconds.items()]


def peak_memory(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated while `fn` runs, above what was allocated before it."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Running sum of CPU allocations and frees, in event order: its maximum is the peak.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def peak_resident(fn: Callable[[], object], device) -> int:
    """Peak bytes while `fn` runs, above what was held before it: on CUDA the allocator's
    peak; on the CPU the process's resident set, sampled every millisecond (the profiler's
    running sum misses frees of tensors that safetensors hands over from a file)."""
    if torch.device(device).type == "cuda":
        return peak_memory(fn, device)
    process = psutil.Process()
    gc.collect()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, process.memory_info().rss) - before


def scan_memory(bridge, ids: torch.Tensor, chunk: int = 128):
    """Peak memory above the loaded model for a 1-text scan, four ways, in units of one
    layer's ``hook_post`` activation."""
    device = bridge.cfg.device
    ids = ids[None].to(device)
    names = {f(layer) for layer in range(bridge.cfg.n_layers) for f in (hook_post, hook_mlp_out)}
    one_post = (
        ids.shape[1] * bridge.cfg.d_mlp * torch.empty((), dtype=bridge.cfg.dtype).element_size()
    )

    def cached():
        with torch.inference_mode():
            bridge.run_with_cache(ids, names_filter=names.__contains__, return_type=None)

    def bare():
        with torch.inference_mode():
            bridge(ids, return_type=None)

    hf_twin(bridge)  # built once per model, outside the measurement
    rows = {
        "bare forward through the bridge": peak_memory(bare, device),
        "streaming scan (sw_lens.scan)": peak_memory(lambda: scan(bridge, [ids[0]], False), device),
        f"layer-major scan, chunk {chunk} (sw_lens.layer_major)": peak_memory(
            lambda: scan_layer_major(bridge, [ids[0]], False, chunk), device
        ),
        "run_with_cache of all hook_post/hook_mlp_out": peak_memory(cached, device),
    }
    return [(name, peak, peak / one_post) for name, peak in rows.items()], one_post


def prefix_reuse(bridge, tokens, protocol: Protocol, layer: int, k: int = 8, repeats=1):
    """K single-weight ablations in `layer`: one sweep against the naive loop of
    `evaluate` calls (both in the HF twin), in single-pass equivalents."""
    tokens = tokens[: protocol.max_tokens]
    d_model, d_mlp = bridge.cfg.d_model, bridge.cfg.d_mlp
    ablations = [[WeightCoord(layer, (7 * i) % d_model, (13 * i) % d_mlp)] for i in range(k)]

    def naive():
        evaluate(bridge, tokens, protocol, "bench")
        for a in ablations:
            evaluate(bridge, tokens, protocol, "bench", a)

    seconds = interleaved(
        {
            "one pass": lambda: evaluate(bridge, tokens, protocol, "bench"),
            "naive loop": naive,
            "sweep": lambda: evaluate_sweep(bridge, tokens, protocol, "bench", ablations),
        },
        bridge.cfg.device,
        repeats,
    )
    n = bridge.cfg.n_layers
    one = seconds["one pass"]
    return {
        "k": k,
        "layer": layer,
        "n_layers": n,
        "naive_passes": seconds["naive loop"] / one,
        "sweep_passes": seconds["sweep"] / one,
        "predicted_sweep_passes": 1 + k * (n - layer) / n,
        "saving": seconds["naive loop"] / seconds["sweep"],
    }


def hook_vs_edit(bridge, ids: torch.Tensor, coord: WeightCoord) -> float:
    """Max |logit difference| between the hook ablation and editing the weight."""
    from sw_lens.patching import edited_weights

    ids = ids[None].to(bridge.cfg.device)
    with torch.inference_mode():
        hooked = bridge.run_with_hooks(ids, fwd_hooks=ablation_hooks(bridge, [coord]))
        with edited_weights(bridge, [coord]):
            edited = bridge(ids)
    return float((hooked.float() - edited.float()).abs().max())


def parser(description: str) -> argparse.ArgumentParser:
    """The options every CPU benchmark takes: --tiny (the CI smoke run) and --device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny random model")
    p.add_argument("--device", default="cpu")
    return p


def pass_parser(description: str) -> argparse.ArgumentParser:
    """`parser`, with the setting of a perplexity pass on a real model."""
    p = parser(description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048, help="corpus tokens per pass")
    p.add_argument("--repeats", type=int, default=3)
    return p


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(row):
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"\n{title}\n", line(header), sep, *map(line, rows)])
