"""The benchmark commands run end to end on tiny configs (smoke only: on a tiny model the
ratios mean nothing, so they are printed, not asserted)."""

import pytest
from conftest import run_experiment


@pytest.mark.parametrize("script", ["run.py", "gpu_check.py"])
def test_benchmark_runs_on_a_tiny_config(script):
    done = run_experiment(f"benchmarks/{script}", "--tiny", timeout=300)
    assert done.returncode == 0, done.stderr
    for title in ("Perplexity throughput", "Scan memory", "Prefix reuse"):
        assert title in done.stdout


def test_the_search_benchmark_runs_on_a_tiny_config():
    done = run_experiment("benchmarks/search.py", "--tiny", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Threshold-free search" in done.stdout and "x plain run" in done.stdout


def test_the_circuit_benchmark_runs_on_a_tiny_config():
    done = run_experiment("benchmarks/circuit.py", "--tiny", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Circuit patching cost" in done.stdout and "attribution patching <= 3" in done.stdout


def test_the_streaming_benchmark_runs_on_a_tiny_config():
    done = run_experiment("benchmarks/stream.py", "--tiny", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Streamed vs in-memory" in done.stdout and "x unit" in done.stdout
