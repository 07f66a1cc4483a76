"""track.py over training checkpoints shows a super weight appearing and growing."""

import csv

import torch
from conftest import run_experiment
from matplotlib.image import imread
from nanogpt_reference import CHARS, GPT, TRIGGER, model_args, plant, save_checkpoint, write_meta

from sw_lens.results import read_json

PLANT = dict(layer=2, row=9, col=40, dim=7)


def checkpoints(tmp_path):
    """Three steps of one run: no super weight at 0, then one growing (4 -> 8)."""
    run = tmp_path / "out-chars"
    run.mkdir()
    write_meta(run / "meta.pkl")
    for step, value in [(0, None), (1000, 4.0), (2000, 8.0)]:
        torch.manual_seed(step)
        model = GPT(model_args()).eval()
        if value is not None:
            plant(model, *PLANT.values(), value, trigger_id=CHARS.index(TRIGGER))
        save_checkpoint(run / f"ckpt_{step}.pt", model, model_args(), iter_num=step)
    return run


def test_track_reports_the_super_weight_appearing(tmp_path):
    run, out = checkpoints(tmp_path), tmp_path / "report"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A Quiet question: Quite so. " * 12)
    done = run_experiment(
        "track.py",
        str(run),
        "--prompt",
        "The Queen spoke.",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--ppl",
        "--text",
        str(corpus),
        "--window",
        "64",
        "--max-tokens",
        "256",
    )
    assert done.returncode == 0, done.stderr
    doc = read_json(out / "track.json", "track")  # valid against its schema
    assert doc.model.n_layers == model_args()["n_layer"]  # the first checkpoint's model
    assert [r.iter_num for r in doc.checkpoints] == [0, 1000, 2000]
    found = [[(c.layer, c.row, c.col, c.value) for c in r.candidates] for r in doc.checkpoints]
    assert found == [[], [(2, 9, 40, 4.0)], [(2, 9, 40, 8.0)]]
    later = doc.checkpoints[2]
    assert later.spike.layer == 2 and later.spike.token == TRIGGER
    assert later.max_mlp_out[2] > 1.5 * doc.checkpoints[1].max_mlp_out[2]
    assert later.candidates[0].checkpoint_param == "transformer.h.2.mlp.c_proj.weight"
    assert later.perplexity.ablated.n_tokens == later.perplexity.baseline.n_tokens
    assert doc.checkpoints[0].perplexity.ablated is None  # nothing to ablate at step 0
    rows = list(csv.DictReader((out / "track.csv").open()))
    assert [r["weights"] for r in rows] == ["", "2:9,40=4", "2:9,40=8"]
    n_scored = later.perplexity.baseline.n_tokens
    assert rows[2]["ppl_protocol"] == (
        f"{corpus}, token-level, window 64 (non-overlapping), no BOS, first 256 tokens, "
        f"{n_scored} tokens scored"
    )
    pixels = imread(out / "track.png")
    assert pixels.shape[1] == 1020 and (pixels[..., :3] < 0.9).any(-1).mean() > 0.02
    assert (out / "track.pdf").read_bytes()[:5] == b"%PDF-"


def test_track_refuses_missing_checkpoints(tmp_path):
    done = run_experiment("track.py", tmp_path / "nope.pt")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: checkpoint '{tmp_path / 'nope.pt'}' does not exist"


def test_checkpoints_of_different_models_are_one_line(tmp_path):
    run = checkpoints(tmp_path)
    other = model_args(n_layer=2)
    save_checkpoint(run / "ckpt_3000.pt", GPT(other).eval(), other, iter_num=3000)
    done = run_experiment("track.py", run, "--device", "cpu", "--out", tmp_path / "report")
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "ckpt_3000.pt' is not the shape of" in line and "track one model's" in line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "report").exists()
