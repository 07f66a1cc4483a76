"""Progress: bars in a terminal, plain lines in a log, nothing with --quiet."""

import re

import pytest
import torch
from conftest import ONE, build, run_experiment, save
from torch import nn

from sw_lens import progress

LINE = re.compile(r"^(\w[\w ]*): (\d+)/(\d+) (\w+)s done, .+, .+ left$")


@pytest.fixture
def lines_every_update():
    progress.configure(quiet=False, interval=0)
    yield
    progress.configure()


def test_without_a_terminal_progress_is_plain_lines(capsys, lines_every_update):
    for _ in progress.bar(range(3), desc="baseline", unit="window"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    found = [LINE.match(line) for line in err.splitlines()]
    assert all(found) and found[-1].groups() == ("baseline", "3", "3", "window")


def test_per_layer_moves_the_bar_within_one_forward(lines_every_update):
    layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    seen = []
    layers[2].register_forward_pre_hook(lambda *_: seen.append(shown.n))  # 2 of 4 done
    with progress.bar(desc="perplexity", unit="window", total=6) as shown:
        with progress.per_layer(shown, list(layers)) as carrying:
            carrying(6)
            layers(torch.zeros(1, 2))
    assert seen == [pytest.approx(3.0)]  # half-way through the layers, half the windows
    assert shown.n == pytest.approx(6.0)


def test_quiet_prints_nothing(capsys):
    progress.configure(quiet=True)
    try:
        for _ in progress.bar(range(3), desc="baseline", unit="window"):
            pass
    finally:
        progress.configure()
    assert capsys.readouterr().err == ""


def test_a_redirected_command_shows_progress_lines_unless_quiet(tmp_path):
    model = save(build("llama", [ONE]), tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some words with the trigger A in them, and A again. " * 12)
    args = ["--model", model, "--text", corpus, "--window", "64", "--max-tokens", "256"]
    args += ["--rank-tokens", "128", "--device", "cpu", "--prompt", "xyz A qrs", "--find", "rule"]
    done = run_experiment("locate.py", *args, "--out", tmp_path / "a")
    assert done.returncode == 0, done.stderr
    report = [m for m in map(LINE.match, done.stderr.splitlines()) if m and m[1] == "report"]
    assert report and report[-1].groups()[1:] == ("4", "4", "window")
    quiet = run_experiment("locate.py", *args, "--out", tmp_path / "b", "--quiet")
    assert quiet.returncode == 0 and not any(map(LINE.match, quiet.stderr.splitlines()))
