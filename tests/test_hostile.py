"""Hostile input through the real commands, one table per class of input: every case is
one `error:` line (the last on stderr, after any progress lines), exit code 2, no
traceback and nothing new under --out. Tables run the commands in this interpreter
(`run_in_process`: the same code path, without a fresh interpreter's imports); the
cases that need a process of their own (signals at start-up) run as subprocesses."""

import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ONE, REPO, build, run_experiment, run_in_process, save
from nanogpt_reference import GPT, model_args, save_checkpoint, write_meta

CORPUS = "Some words with the trigger A in them, and A again. " * 12


def assert_refused(done, out, message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    (line,) = [line for line in lines if line.startswith("error")]
    assert line == lines[-1] and line.startswith("error: ") and message in line, line
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "corpus.txt").write_text(CORPUS)
    return save(build("llama", [ONE]), folder / "tiny-llama")


# --- nanoGPT checkpoints and meta.pkl: what the file contains, not only that it unpickles


def nanogpt_checkpoint(folder, change=lambda raw: None, meta=None):
    torch.manual_seed(0)
    args = model_args()
    path = save_checkpoint(folder / "ckpt.pt", GPT(args).eval(), args)
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)
    write_meta(folder / "meta.pkl")
    if meta is not None:
        (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return path


def args_set(key, value):
    return lambda raw: raw["model_args"].update({key: value})


NANOGPT = [
    (args_set("n_layer", "4"), None, "model_args n_layer must be a positive integer, got '4'"),
    (args_set("n_embd", [32]), None, "model_args n_embd must be a positive integer"),
    (args_set("n_head", 0), None, "model_args n_head must be a positive integer, got 0"),
    (args_set("n_head", 5), None, "n_embd 32 is not a multiple of n_head 5"),
    (args_set("bias", "yes"), None, "model_args bias must be true or false"),
    (args_set("vocab_size", 10**9), None, "parameters: ~"),  # refused before allocating
    (lambda raw: raw.update(model_args=[1, 2]), None, "model_args is a list, not a table"),
    (lambda raw: raw.update(iter_num="1000"), None, "iter_num '1000' is no step number"),
    (lambda raw: raw.update(model={"w": 1}), None, "'model' is not a state dict of named"),
    (lambda raw: raw.update(config={"dataset": "../../etc"}), None, "is no folder name"),
    (lambda raw: None, {"stoi": {}}, "the 'stoi' vocabulary is empty"),
    (lambda raw: None, {"stoi": {"a": "1"}}, "'stoi' must map characters to non-negative"),
    (lambda raw: None, {"stoi": {1: 2}}, "'stoi' must map characters to non-negative"),
    (lambda raw: None, {"stoi": {"a": 0, "b": 0}}, "two characters of 'stoi' share an id"),
    (lambda raw: None, {"stoi": {"a": True}}, "'stoi' must map characters to non-negative"),
]


@pytest.mark.parametrize(("change", "meta", "message"), NANOGPT)
def test_a_malformed_nanogpt_checkpoint_is_one_line(tmp_path, change, meta, message):
    path = nanogpt_checkpoint(tmp_path, change, meta)
    out = tmp_path / "out"
    done = run_in_process("locate.py", "--model", path, "--device", "cpu", "--out", out)
    assert_refused(done, out, message)


@pytest.mark.parametrize(
    ("args_text", "message"),
    [("{", "model_args.json is not valid JSON"), ("[]", "model_args is a list")],
)
def test_a_bare_state_dict_with_malformed_model_args_json(tmp_path, args_text, message):
    torch.save(GPT(model_args()).state_dict(), tmp_path / "bare.pt")
    (tmp_path / "model_args.json").write_text(args_text)
    write_meta(tmp_path / "meta.pkl")
    out = tmp_path / "out"
    done = run_in_process("locate.py", "--model", tmp_path / "bare.pt", "--out", out)
    assert_refused(done, out, message)


def test_a_track_run_with_a_non_integer_iter_num_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    nanogpt_checkpoint(run)
    (run / "ckpt.pt").rename(run / "ckpt_0.pt")
    nanogpt_checkpoint(run, lambda raw: raw.update(iter_num=2.5))
    out = tmp_path / "out"
    done = run_experiment("track.py", run, "--device", "cpu", "--out", out)
    assert_refused(done, out, "iter_num 2.5 is no step number")


def test_an_invalid_config_json_is_named(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((llama_dir / name).read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama", ')
    out = tmp_path / "out"
    done = run_experiment("locate.py", "--model", broken, "--out", out)
    assert_refused(done, out, f"cannot read {broken / 'config.json'}")


# --- numbers refused when parsed, not after the run --------------------------------------

NUMBERS = [
    ("locate.py", ["--threshold", "nan"], "argument --threshold: must be a finite number"),
    ("locate.py", ["--min-ratio", "inf"], "argument --min-ratio: must be a finite number"),
    ("locate.py", ["--min-ppl-ratio=-inf"], "must be a finite number"),
    ("locate.py", ["--seed", "-1"], "argument --seed: must be a non-negative integer"),
    ("locate.py", ["--seed", str(2**40)], "must be a non-negative integer <= 4294967295"),
    ("controls.py", ["--scales", "0.5,nan"], "argument --scales: must be a finite number"),
    ("controls.py", ["--draws", "-3"], "argument --draws: must be a non-negative integer"),
    ("quantize.py", ["--clip-value", "nan"], "argument --clip-value: must be a finite number"),
    ("restore.py", ["--fraction", "inf"], "argument --fraction: must be a finite number"),
    ("scaling.py", ["--factors", "1,inf"], "argument --factors: must be a finite number"),
]


@pytest.mark.parametrize(("script", "args", "message"), NUMBERS)
def test_non_finite_and_out_of_range_numbers_are_refused_at_parse_time(
    llama_dir, tmp_path, script, args, message
):
    out = tmp_path / "out"
    done = run_in_process(script, "--model", llama_dir, *args, "--out", out)
    assert_refused(done, out, message)


# --- the output folder -------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_written_fails_before_the_work(llama_dir, tmp_path):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    for out, message in [
        (existing, "is an existing file"),
        (existing / "sub", "is a file"),
        ("/proc/sw_lens-out", "cannot write output folder '/proc/sw_lens-out'"),  # even root
    ]:
        start = time.monotonic()
        done = run_in_process(
            "locate.py", "--model", llama_dir, "--text", llama_dir.parent / "corpus.txt",
            "--window", "64", "--device", "cpu", "--out", out,
        )  # fmt: skip
        assert_refused(done, tmp_path / "nothing", message)
        assert time.monotonic() - start < 30  # refused before the model is even loaded
    assert existing.read_text() == "keep me"


def small_locate(llama_dir, out):
    corpus = llama_dir.parent / "corpus.txt"
    return ["--model", llama_dir, "--text", corpus, "--window", "64", "--max-tokens", "256"] + [
        "--rank-tokens", "128", "--device", "cpu", "--prompt", "xyz A qrs", "--out", out,
    ]  # fmt: skip


def test_a_full_disk_while_writing_figures_leaves_the_folder_as_it_was(
    llama_dir, tmp_path, monkeypatch
):
    import matplotlib.figure

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("the previous run's results")
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, path, **kwargs):
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        saved.append(path)
        return real_savefig(self, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    done = run_in_process("locate.py", *small_locate(llama_dir, out))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"error: cannot write results into '{out}': No space left on device"
    )
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert (out / "results.json").read_text() == "the previous run's results"


def test_ctrl_c_while_figures_are_written_leaves_nothing_and_says_so(
    llama_dir, tmp_path, monkeypatch
):
    import matplotlib.figure

    out = tmp_path / "out"
    real_savefig = matplotlib.figure.Figure.savefig
    calls = []

    def savefig(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, mid-way through the figures
        return real_savefig(self, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    done = run_in_process("locate.py", *small_locate(llama_dir, out))
    assert done.returncode == 130
    assert done.stderr.strip().splitlines()[-1] == "interrupted: no results were written"
    assert not out.exists()


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "locate.py"), "--out", tmp_path / "out"],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # importing torch and transformers takes seconds
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read() == "interrupted: no results were written\n"
    assert not (tmp_path / "out").exists()


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


MODEL_FILES = [
    ("tokenizer.json", lambda p: p.write_text('{"model": 5}'), "lacks the entry 'added_tokens'"),
    ("tokenizer.json", lambda p: p.write_text(p.read_text()[:500]), "cannot load"),
    ("config.json", lambda p: edit_json(p, num_hidden_layers="6"), "num_hidden_layers"),
    ("config.json", lambda p: edit_json(p, vocab_size=-5), "negative dimension"),
    ("config.json", lambda p: edit_json(p, num_attention_heads=0), "(config.json)"),
    ("model.safetensors", lambda p: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"), "header"),
]


@pytest.mark.parametrize(("name", "damage", "message"), MODEL_FILES)
def test_a_malformed_model_file_is_one_line(llama_dir, tmp_path, name, damage, message):
    model = tmp_path / "model"
    model.mkdir()
    for path in llama_dir.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    damage(model / name)
    out = tmp_path / "out"
    done = run_in_process("locate.py", "--model", model, "--device", "cpu", "--out", out)
    assert_refused(done, out, message)


def test_non_finite_weights_are_named_at_their_first_layer(tmp_path):
    model = build("llama", [ONE])
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    path = save(model, tmp_path / "nan-weights")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "out"
    done = run_in_process(
        *("locate.py", "--model", path, "--text", corpus, "--window", "64"),
        *("--device", "cpu", "--out", out),
    )
    assert_refused(done, out, "blocks.2.mlp.out.hook_out has inf/NaN values in torch.float32")
    assert "the checkpoint's weights up to this layer hold inf/NaN" in done.stderr
