"""Models spread by accelerate's device map (`sw_lens.placement`), tested with its CPU
and disk offload (this machine has no GPU): locate end to end gives the in-memory
results, the placement is recorded, and a bad device map is one line. The numbers of
every family are in the coverage matrix (tests/test_coverage.py)."""

import json

import pytest
import torch
from conftest import ONE, PROMPT, TOY, build, offload_map, run_in_process, save

from sw_lens.errors import SwLensError
from sw_lens.locate_job import run_locate
from sw_lens.models import load_model
from sw_lens.placement import resident
from sw_lens.setup import LocateConfig
from sw_lens.vocabulary import w_out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(build("llama", [ONE]), tmp_path_factory.mktemp("placed") / "model")


@pytest.fixture(scope="module")
def map_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "map.json"
    path.write_text(json.dumps(offload_map(model_dir)))
    return path


def locate_config(toy, **loading) -> LocateConfig:
    return LocateConfig(
        model=str(toy),
        text=str(toy / "corpus.txt"),
        prompts=[PROMPT],
        window=32,
        max_tokens=256,
        rank_tokens=128,
        prediction_prompt="xyz A",
        html_tokens=40,
        **loading,
    )


def test_locate_under_an_offload_map_gives_the_in_memory_results(toy, tmp_path):
    """The threshold-free search (gradients through offloaded layers), the rule, the
    effect ranking and the reported perplexities, with every layer's weights moved
    between disk and memory by accelerate."""
    placement = offload_map(toy)
    (tmp_path / "map.json").write_text(json.dumps(placement))
    placed = run_locate(locate_config(toy, device_map=str(tmp_path / "map.json")))
    memory = run_locate(locate_config(toy, device="cpu"))
    assert placed.model.device_map == placement
    assert memory.model.device_map is None
    found = [(w.layer, w.row, w.col, w.value) for w in placed.super_weights]
    assert found == [(TOY.layer, TOY.row, TOY.col, TOY.value)]
    assert found == [(w.layer, w.row, w.col, w.value) for w in memory.super_weights]
    for a, b in zip(placed.search.measured, memory.search.measured, strict=True):
        assert (a.layer, a.row, a.col, a.contribution_rank, a.saliency_rank) == (
            b.layer,
            b.row,
            b.col,
            b.contribution_rank,
            b.saliency_rank,
        )
        assert a.effect == pytest.approx(b.effect, rel=1e-6)
    ppl = placed.perplexity, memory.perplexity
    assert ppl[0].baseline.perplexity == pytest.approx(ppl[1].baseline.perplexity, rel=1e-6)
    for a, b in zip(ppl[0].ablations, ppl[1].ablations, strict=True):
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)


def test_a_resident_block_keeps_edits_until_it_ends_and_writes_nothing_back(model_dir, map_file):
    model = load_model(str(model_dir), device_map=str(map_file)).bridge
    down = model.blocks[ONE.layer].mlp.out.original_component  # offloaded to disk
    assert down.weight.is_meta
    ids = torch.tensor([[1, 65, 66, 67]])
    with torch.inference_mode():
        before = model(ids, return_type="logits")
        with w_out(model, ONE.layer) as weight:
            weight[ONE.col, ONE.row] = 0.0
            with resident(model.blocks[ONE.layer]):  # nested: nothing loaded twice
                assert down.weight[ONE.row, ONE.col] == 0.0
            edited = model(ids, return_type="logits")
            assert not down.weight.is_meta  # kept through the forward pass
        assert down.weight.is_meta
        after = model(ids, return_type="logits")
    assert not torch.equal(edited, before)
    assert torch.equal(after, before)  # the stored copy was never written


BAD_MAPS = [
    ("{not json", "cannot read device map"),
    ("[1, 2]", "expected a JSON object {module: device}"),
    ('{"model.layers.0": "gpu"}', "'model.layers.0' -> 'gpu'; a device is a GPU index"),
    ('{"model.layers.0": true}', "a device is a GPU index"),
    ('{"": "disk", "model.nothing": "cpu"}', "the model has no module 'model.nothing'"),
    ('{"model.layers.0": "cpu"}', "no device for model.embed_tokens.weight"),
]


@pytest.mark.parametrize(("text", "message"), BAD_MAPS)
def test_a_bad_device_map_is_one_line(model_dir, tmp_path, text, message):
    bad = tmp_path / "map.json"
    bad.write_text(text)
    done = run_in_process(
        "locate.py", "--model", model_dir, "--device-map", bad, "--out", tmp_path / "out"
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-map", "everywhere"], "neither one of auto, balanced"),
        (["--device-map", "auto", "--device", "cpu"], "give a device ('cpu') or a device map"),
        (["--device-map", "auto", "--stream", "on"], "--stream on and --device-map exclude"),
    ],
)
def test_device_map_options_that_cannot_work_are_one_line(model_dir, tmp_path, args, message):
    done = run_in_process("locate.py", "--model", model_dir, *args, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_device_map_needs_an_hf_format_model(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SwLensError, match="a device map needs an HF-format model"):
        load_model(str(gguf), device_map="auto")
