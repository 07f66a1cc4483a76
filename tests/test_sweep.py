"""Sweep files, running them locally, the sbatch script they render, and the report."""

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ONE, build, run_experiment, save

from sw_lens.errors import SwLensError
from sw_lens.sweep import collect, load_sweep, python_and_repo, render_sbatch, run_task, table_csv

CORPUS = "Some words with the trigger A in them, and A again. " * 12
DEFAULTS = {
    "device": "cpu",
    "window": 64,
    "max_tokens": 256,
    "rank_tokens": 128,
    "prompt": "xyz A qrs",
    "min_ppl_ratio": 0,
    "find": "rule",  # a random tiny model does not depend on its planted weight
}


def toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_sweep(folder: Path, runs: list[dict], slurm: dict | None = None) -> Path:
    """A sweep file over `runs` (model paths under `folder`) with the test defaults."""
    (folder / "corpus.txt").write_text(CORPUS)
    lines = ["[sweep]", f'out = "{folder / "out"}"', "[defaults]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in DEFAULTS.items()]
    lines.append(f'text = "{folder / "corpus.txt"}"')
    if slurm:
        lines.append("[slurm]")
        lines += [f"{k} = {toml_value(v)}" for k, v in slurm.items()]
    for run in runs:
        lines.append("[[runs]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in run.items()]
    path = folder / "sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def models(tmp_path) -> Path:
    save(build("llama", [ONE]), tmp_path / "tiny-llama")
    save(build("gpt2", [ONE]), tmp_path / "tiny-gpt2")
    return tmp_path


def three_runs(folder: Path) -> list[dict]:
    """Two tiny models and one that does not exist (its run must fail alone)."""
    return [
        {"model": str(folder / "tiny-llama")},
        {"model": str(folder / "no-such-model")},
        {"model": str(folder / "tiny-gpt2"), "experiments": ["locate", "scaling"]},
    ]


def test_a_sweep_runs_locally_and_reports_every_run(models):
    sweep = load_sweep(write_sweep(models, three_runs(models)))
    assert [r.name for r in sweep.runs] == ["tiny-llama", "no-such-model", "tiny-gpt2"]
    assert sweep.runs[0].options["window"] == 64 and sweep.runs[2].experiments[1] == "scaling"
    python, _ = python_and_repo()
    (sweep.out).mkdir()
    (sweep.out / "sweep.json").write_text(json.dumps(sweep.to_dict()))
    statuses = [run_task(sweep, i, python)["status"] for i in (0, 1)]
    assert statuses == ["ok", "failed"]
    rows, _ = collect(sweep.out)
    by_run = {r["run"]: r for r in rows}
    ok = by_run["tiny-llama"]
    assert (ok["status"], ok["layer"], ok["row"], ok["col"], ok["value"]) == ("ok", 1, 5, 17, 8.0)
    assert ok["ratio"] == pytest.approx(ok["ablated_ppl"] / ok["baseline_ppl"])
    assert "window 64" in ok["protocol"]
    assert by_run["no-such-model"]["status"] == "failed"
    assert "model path" in by_run["no-such-model"]["error"]
    assert by_run["tiny-gpt2"]["status"] == "missing"  # never ran: listed, not skipped
    assert table_csv(rows).splitlines()[0].startswith("run,model,status,layer,row,col,value")


def test_the_commands_run_local_resume_and_report(models, tmp_path):
    path = write_sweep(models, three_runs(models)[:2])
    done = run_experiment("sweep.py", "local", path)
    assert done.returncode == 0, done.stderr
    assert "run 1 (no-such-model): failed" in done.stdout
    done = run_experiment("sweep.py", "local", path, "--resume")
    assert "run 0" not in done.stdout and "run 1 (no-such-model): failed" in done.stdout
    out = models / "out"
    done = run_experiment("sweep.py", "report", out)
    assert done.returncode == 0, done.stderr
    assert (out / "report.csv").is_file() and (out / "report.md").is_file()
    assert (out / "report.png").is_file()
    assert "failed: no-such-model" in done.stdout
    done = run_experiment("sweep.py", "plan", path)
    assert "tiny-llama" in done.stdout and " ok " in done.stdout


SLURM = {
    "partition": "gpu",
    "time": "01:30:00",
    "gpus_per_task": 1,
    "cpus_per_task": 4,
    "mem": "32G",
    "max_parallel": 2,
    "setup": ["module load cuda", "source ~/venv/bin/activate"],
    "extra": ["--account=lab"],
}


def test_the_sbatch_script_is_rendered_from_the_sweep_and_is_valid_bash(models):
    sweep = load_sweep(write_sweep(models, three_runs(models), SLURM))
    python, repo = python_and_repo()
    script = render_sbatch(sweep, [0, 2], python, repo)
    directives = [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
    ]
    logs = sweep.out / "slurm"
    assert directives == [
        "--job-name=sw_lens-sweep",
        "--array=0,2%2",
        f"--output={logs}/%A_%a.out",
        f"--error={logs}/%A_%a.err",
        "--ntasks=1",
        "--partition=gpu",
        "--time=01:30:00",
        "--gpus-per-task=1",
        "--cpus-per-task=4",
        "--mem=32G",
        "--account=lab",
    ]
    assert "module load cuda\nsource ~/venv/bin/activate" in script
    assert f"-m experiments.sweep task '{sweep.path}'" in script
    path = models / "rendered.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[runs]]\nmodle = 'gpt2'\n", "unknown key 'modle'; did you mean 'model'?"),
        (
            "[defaults]\nwindow = 'big'\n[[runs]]\nmodel = 'gpt2'\n",
            "'window' must be a valid integer, got 'big'",
        ),
        ("[slurm]\npartion = 'gpu'\n[[runs]]\nmodel = 'gpt2'\n", "did you mean 'partition'?"),
        ("[[runs]]\nmodel = 'gpt2'\nexperiments = ['locat']\n", "did you mean 'locate'?"),
        ("[sweep]\n", "has no [[runs]]"),
        ("[[runs]]\nmodel = 'gpt2'\n[[runs]]\nmodel = 'gpt2'\n", "two runs share a name"),
        ("[[runs]\n", "is not valid TOML"),
        # Wrong types anywhere: one line, not a traceback.
        ("[sweep]\nexperiments = 5\n[[runs]]\nmodel = 'gpt2'\n", "must be a list of strings"),
        ("runs = 3\n", "'runs' must be an array of tables"),
        ("runs = [1, 2]\n", "runs[0] must be a table"),
        ("defaults = 3\n[[runs]]\nmodel = 'gpt2'\n", "[defaults] must be a table"),
        ("sweep = 'x'\n[[runs]]\nmodel = 'gpt2'\n", "[sweep] must be a table"),
        ("slurm = []\n[[runs]]\nmodel = 'gpt2'\n", "[slurm] must be a table"),
        ("[sweep]\nout = 3\n[[runs]]\nmodel = 'gpt2'\n", "out must be a string"),
        ("[[runs]]\nmodel = 'gpt2'\nname = 7\n", "'name' must be a string"),
        ("[[runs]]\nmodel = 'gpt2'\nexperiments = 'locate'\n", "must be a list of strings"),
        ("[[runs]]\nmodel = 'gpt2'\nthreshold = nan\n", "'threshold' must be a finite number"),
        ("[[runs]]\nmodel = 'gpt2'\nmin_ratio = inf\n", "'min_ratio' must be a finite number"),
        ("[[runs]]\nmodel = 3\n", "'model' must be a valid string, got 3"),
    ],
)
def test_a_bad_sweep_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(SwLensError, match=re.escape(message)):
        load_sweep(path)


def test_a_typo_in_a_sweep_file_exits_2_and_writes_nothing(tmp_path):
    path, out = tmp_path / "sweep.toml", tmp_path / "out"
    path.write_text(f'[sweep]\nout = "{out}"\n[[runs]]\nmodel = "gpt2"\ndtpye = "float16"\n')
    for command in ("plan", "slurm"):
        done = run_experiment("sweep.py", command, path)
        assert done.returncode == 2
        assert done.stderr.strip().endswith(
            "did you mean 'dtype'? (valid: args, batch_size, bos, check_known, confirm_margin, "
            "device, device_map, dtype, experiments, find, html_tokens, iterations, max_tokens, "
            "max_walk, min_ppl_ratio, min_ratio, model, name, negligible, prediction_prompt, "
            "prompt, prompt_bos, rank_tokens, recall_sample, registry, search_k, seed, stop_run, "
            "stream, stride, text, threshold, tokenizer, top_channels, trust_remote_code, "
            "weight, window)"
        )
        assert "Traceback" not in done.stderr and not out.exists()


def test_relative_paths_are_relative_to_the_sweep_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "models" / "tiny").mkdir(parents=True)
    (folder / "corpus.txt").write_text(CORPUS)
    (folder / "map.json").write_text('{"": "cpu"}')
    path = folder / "sweep.toml"
    path.write_text(
        '[sweep]\nout = "results"\n[defaults]\ntext = "corpus.txt"\n'
        '[[runs]]\nmodel = "models/tiny"\ndevice_map = "map.json"\n'
        '[[runs]]\nmodel = "gpt2"\ntext = "lee"\ndevice_map = "auto"\n'
    )
    monkeypatch.chdir(tmp_path)  # anywhere but the file's folder
    sweep = load_sweep(path)
    assert sweep.out == folder / "results"
    assert sweep.runs[0].options == {
        "text": str(folder / "corpus.txt"),
        "model": str(folder / "models" / "tiny"),
        "device_map": str(folder / "map.json"),
    }
    assert sweep.runs[1].options == {"text": "lee", "model": "gpt2", "device_map": "auto"}
    assert load_sweep(path, out="elsewhere").out == tmp_path / "elsewhere"


def test_experiment_options_reach_only_their_experiment(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        '[sweep]\nexperiments = ["locate", "controls", "quantize"]\n'
        '[defaults]\nargs = { quantize = ["--bits", "4"] }\n'
        '[[runs]]\nmodel = "gpt2"\nargs = { controls = ["--n-largest", "129"] }\n'
    )
    (run,) = load_sweep(path).runs
    locate, controls, quantize = run.commands(tmp_path / "out", "python")
    assert "--n-largest" not in locate and "--bits" not in locate
    assert controls[-2:] == ["--n-largest", "129"] and "--bits" not in controls
    assert quantize[-2:] == ["--bits", "4"] and "--results" in quantize
    path.write_text(
        '[sweep]\nexperiments = ["locate", "controls"]\n'
        '[[runs]]\nmodel = "gpt2"\nstream = "off"\nhtml_tokens = 64\n'
    )
    (run,) = load_sweep(path).runs
    locate, controls = run.commands(tmp_path / "out", "python")
    assert {"--stream=off", "--html-tokens=64"} <= set(locate)
    assert "--stream=off" in controls  # a job option; --html-tokens is locate's own
    assert not any(word.startswith("--html") for word in controls)
    path.write_text('[[runs]]\nmodel = "gpt2"\nstream = "sometimes"\n')
    with pytest.raises(SwLensError, match="'stream' must be 'auto', 'on' or 'off'"):
        load_sweep(path)
    path.write_text('[[runs]]\nmodel = "gpt2"\nargs = { control = ["--draws", "3"] }\n')
    with pytest.raises(SwLensError, match=r"did you mean 'controls'\?"):
        load_sweep(path)
    path.write_text('[[runs]]\nmodel = "gpt2"\nargs = { controls = "--draws 3" }\n')
    with pytest.raises(SwLensError, match="args.controls must be a list of strings"):
        load_sweep(path)


INJECTIONS = ["gpu\necho PWNED > pwned", "gpu;touch pwned", "$(touch pwned)", "`touch pwned`"]


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("key", ["partition", "account", "qos", "time", "mem", "job_name"])
def test_slurm_values_with_shell_syntax_are_refused(tmp_path, key, injection):
    path = write_sweep(tmp_path, [{"model": "gpt2"}], SLURM | {key: injection})
    with pytest.raises(SwLensError, match=rf"\[slurm\] {key} must be"):
        load_sweep(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_parallel", "2\necho PWNED", "must be an integer >= 1"),
        ("max_parallel", 0, "must be an integer >= 1"),
        ("max_parallel", True, "must be an integer >= 1"),
        ("cpus_per_task", "4;id", "must be an integer >= 1"),
        ("gpus_per_task", "1\nid", "must be a GPU count"),
        ("extra", ["--account=lab\necho PWNED"], "must hold sbatch options"),
        ("extra", ["--comment=$(id)"], "must hold sbatch options"),
        ("extra", "--account=lab", "must be a list of strings"),
        ("setup", ["module load cuda\necho PWNED"], "newline or control character"),
        ("setup", 3, "must be a list of strings"),
        ("setup", ["ok", "\rcarriage"], "newline or control character"),
    ],
)
def test_other_slurm_values_are_checked(tmp_path, key, value, message):
    path = write_sweep(tmp_path, [{"model": "gpt2"}], SLURM | {key: value})
    with pytest.raises(SwLensError, match=message):
        load_sweep(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[runs]]\nmodel = "gpt2"\nprompt = "a\\necho PWNED"\n', "newline or control character"),
        ('[[runs]]\nmodel = "gpt2"\nname = "x\\ny"\n', None),  # names are slugs: safe
        ('[sweep]\nout = "o\\nut"\n[[runs]]\nmodel = "gpt2"\n', "newline or control character"),
        ('[[runs]]\nmodel = "gpt2"\nargs = { controls = ["--draws\\n3"] }\n', "newline"),
    ],
)
def test_run_values_cannot_start_a_script_line(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    if message is None:
        (run,) = load_sweep(path).runs
        assert run.name == "x-y"
        return
    with pytest.raises(SwLensError, match=message):
        load_sweep(path)


def test_paths_in_the_script_are_one_quoted_word_and_nothing_runs(tmp_path):
    """A sweep file and output folder named with shell syntax: the script is valid bash,
    and running it runs the task command with the names as plain words, nothing else."""
    folder = tmp_path / "a$(touch pwned1);'b`touch pwned2`"
    folder.mkdir()
    path = folder / "s;touch pwned3;.toml"
    path.write_text('[[runs]]\nmodel = "gpt2"\n')
    sweep = load_sweep(path, out=tmp_path / "out$(touch${IFS}pwned4)")  # no blank or quote
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(sweep, [0], "echo", folder))
    done = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env={"SLURM_ARRAY_TASK_ID": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"-m experiments.sweep task {path} 0 --out {sweep.out}"
    assert not list(tmp_path.rglob("pwned*"))
    assert "#SBATCH --job-name=sw_lens-s-touch-pwned3\n" in script.read_text()


@pytest.mark.parametrize("out", ["with space", "per%cent", "new\nline"])
def test_an_output_folder_that_sbatch_lines_cannot_hold_is_refused(tmp_path, out):
    path = write_sweep(tmp_path, [{"model": "gpt2"}], SLURM)
    sweep = load_sweep(path, out=tmp_path / out)
    with pytest.raises(SwLensError, match="choose another --out"):
        render_sbatch(sweep, [0], "python", tmp_path)


def test_the_report_names_malformed_run_records_and_a_bad_plan_is_one_line(tmp_path):
    out = tmp_path / "sweep-out"
    runs = [
        {"index": i, "name": f"r{i}", "experiments": ["locate"], "options": {"model": "m"}}
        | {"args": {}}
        for i in range(3)
    ]
    plan = {"sweep_file": str(tmp_path / "s.toml"), "out": "/elsewhere", "slurm": {}, "runs": runs}
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps(plan))
    folders = [out / "runs" / f"{i:03d}-r{i}" for i in range(3)]
    for folder in folders[:2]:
        folder.mkdir(parents=True)
    (folders[0] / "status.json").write_text(json.dumps({"run": runs[0], "status": "ok"}))
    (folders[1] / "status.json").write_text(
        json.dumps({"run": runs[1], "status": "ok", "steps": []})
    )
    (folders[1] / "results.json").write_text('{"schema_version": 1, "kind": "locate"}')
    done = run_experiment("sweep.py", "report", out)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["status"] for r in rows] == ["invalid", "invalid", "missing"]
    assert "lacks the field 'steps'" in rows[0]["error"]
    assert "results.json' lacks the field 'provenance'" in rows[1]["error"]

    plan["runs"][0]["index"] = "zero"
    (out / "sweep.json").write_text(json.dumps(plan))
    done = run_experiment("sweep.py", "report", out)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "runs[0].index: Input should be a valid integer" in line


def test_report_cells_are_never_spreadsheet_formulas_and_values_never_options(tmp_path):
    rows = [{"run": "=HYPERLINK(1)", "model": "-x\nsecond line", "status": "ok", "value": -1.5}]
    (row,) = list(csv.DictReader(table_csv(rows).splitlines()))
    assert (row["run"], row["model"], row["value"]) == ("'=HYPERLINK(1)", "'-x second line", "-1.5")
    path = tmp_path / "sweep.toml"
    path.write_text('[[runs]]\nmodel = "--help"\n')
    (run,) = load_sweep(path).runs
    (argv,) = run.commands(tmp_path / "out", "python")
    assert "--model=--help" in argv
