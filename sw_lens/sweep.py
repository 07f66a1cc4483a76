"""Sweeps: many models, one sweep file, one results folder per run, one table at the end.

A sweep file (TOML) lists runs; each run is one model with its options and the
experiments to run on it. The same run executes locally (`run_task`, one after another)
or as one task of a SLURM job array (`sw_lens/data/sweep.sbatch`, which calls back
into ``python -m experiments.sweep task``). Every run writes its own folder under the sweep's
output folder, and a ``status.json`` saying whether each experiment succeeded, so a
failed run never hides the others and ``report`` can tell finished, failed and missing
runs apart. Example::

    [sweep]
    out = "results/gpt2-sizes"         # relative to this file; default: out/sweeps/<name>
    experiments = ["locate", "controls"]

    [slurm]                             # only for `sweep.py slurm`
    partition = "gpu"
    time = "02:00:00"
    gpus_per_task = 1
    mem = "32G"
    setup = ["module load cuda", "source ~/venvs/sw_lens/bin/activate"]
    extra = ["--account=my-lab"]

    [defaults]                          # options of every run
    dtype = "bfloat16"
    device = "auto"

    [[runs]]
    model = "gpt2"

    [[runs]]
    model = "Qwen/Qwen2.5-3B"
    name = "qwen2.5-3b"
    window = 2048
    args = { controls = ["--n-largest", "500"] }   # options of one experiment only
"""

import csv
import difflib
import io
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

from sw_lens.documents import KINDS, RunStatus, SweepPlan, validate
from sw_lens.errors import SwLensError
from sw_lens.options import check_table, keys, one_line, options_of, to_argv
from sw_lens.results import read_json, read_toml, write_atomic, write_json
from sw_lens.setup import JOB, LocateConfig

EXPERIMENTS = tuple(kind for kind, entry in KINDS.items() if entry.swept)
# Run options: the job's options (`sw_lens.setup.JOB`), checked and passed as on the
# command line of every experiment; and locate's own (`--stream`, ...), passed to locate.
OPTIONS = options_of(LocateConfig, JOB)
LOCATE_ONLY = keys(LocateConfig, "locate")
LOCATE_OPTIONS = options_of(LocateConfig, LOCATE_ONLY)
RUN_KEYS = {"name", "experiments", "args", *JOB, *LOCATE_ONLY}
STATUS = "status.json"


def _unknown(keys, known: set[str], where: str) -> None:
    """A typo'd key is an error that names it and the nearest valid key."""
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise SwLensError(
                f"{where}: unknown key '{key}'{hint} (valid: {', '.join(sorted(known))})"
            )


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SwLensError(f"{where} must be a table, got {type(value).__name__} {value!r:.40}")
    return value


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SwLensError(f"{where} must be a list of strings, got {value!r:.60}")
    return value


def _one_line(value: str, where: str) -> str:
    """Nothing from a sweep file may start a new line of the generated script."""
    try:
        return one_line(value)
    except ValueError as err:
        raise SwLensError(f"{where} {err}") from None


# --- [slurm]: every value has a grammar; each becomes one #SBATCH line -------------------

_NAME = r"[A-Za-z0-9_.+-]+"


def _matching(pattern: str, grammar: str):
    def check(value, where: str):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise SwLensError(f"{where} must be {grammar}, got {value!r:.60}")
        return value

    return check


def _count(minimum: int):
    def check(value, where: str):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise SwLensError(f"{where} must be an integer >= {minimum}, got {value!r:.60}")
        return value

    return check


def _setup_lines(value, where: str) -> list[str]:
    """Shell lines the sweep's author writes to run before each task (modules, a
    virtual environment): run as written, so one line each and nothing else."""
    lines = [value] if isinstance(value, str) else _strings(value, where)
    return [_one_line(line, where) for line in lines]


def _sbatch_options(value, where: str) -> list[str]:
    option = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=%@/+-]+)?")
    for item in _strings(value, where):
        if not option.fullmatch(item):
            raise SwLensError(
                f"{where} must hold sbatch options like --account=lab (letters, digits and "
                f"_.,:=%@/+- only), got {item!r:.60}"
            )
    return value


SLURM_KEYS = {
    "partition": _matching(rf"{_NAME}(,{_NAME})*", "partition names separated by commas"),
    "account": _matching(_NAME, "an account name (letters, digits, _.+-)"),
    "qos": _matching(_NAME, "a QOS name (letters, digits, _.+-)"),
    "time": _matching(
        r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|infinite|UNLIMITED",
        "a SLURM time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    ),
    "gpus_per_task": _matching(r"([A-Za-z0-9_.-]+:)?\d+", "a GPU count, or TYPE:COUNT"),
    "cpus_per_task": _count(1),
    "mem": _matching(r"\d+[KMGT]?", "a size such as 32G (a number, then K, M, G or T)"),
    "max_parallel": _count(1),
    "job_name": _matching(_NAME, "a job name (letters, digits, _.+-)"),
    "setup": _setup_lines,
    "extra": _sbatch_options,
}


def _checked_slurm(slurm, where: str) -> dict:
    _unknown(_table(slurm, where), set(SLURM_KEYS), where)
    return {key: SLURM_KEYS[key](value, f"{where} {key}") for key, value in slurm.items()}


@dataclass
class Run:
    index: int
    name: str
    experiments: list[str]
    options: dict  # OPTIONS keys -> values
    args: dict[str, list[str]] = field(default_factory=dict)  # experiment -> its own options

    def folder(self, out: Path) -> Path:
        return out / "runs" / f"{self.index:03d}-{self.name}"

    def commands(self, out: Path, python: str) -> list[list[str]]:
        """One command line per experiment; experiments after `locate` reuse its super
        weights through ``--results``."""
        folder = self.folder(out)
        commands = []
        for experiment in self.experiments:
            argv = [python, "-m", f"experiments.{experiment}", "--out", str(folder)]
            argv += to_argv(OPTIONS, {k: v for k, v in self.options.items() if k in JOB})
            if experiment == "locate":
                own = {k: v for k, v in self.options.items() if k in LOCATE_ONLY}
                argv += to_argv(LOCATE_OPTIONS, own)
            elif "locate" in self.experiments:
                argv += ["--results", str(folder / "results.json")]
            commands.append(argv + self.args.get(experiment, []))
        return commands


@dataclass
class Sweep:
    path: Path
    out: Path
    runs: list[Run]
    slurm: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "sweep_file": str(self.path),
            "out": str(self.out),
            "slurm": self.slurm,
            "runs": [asdict(r) for r in self.runs],
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text.rstrip("/")).name).strip("-") or "run"


def _checked_options(options, where: str) -> dict:
    _unknown(_table(options, where), RUN_KEYS, where)
    job = check_table(OPTIONS, {k: v for k, v in options.items() if k in JOB}, where)
    own = {k: v for k, v in options.items() if k in LOCATE_ONLY}
    return job | check_table(LOCATE_OPTIONS, own, where)


def _checked_args(args, where: str) -> dict[str, list[str]]:
    """`args = { controls = ["--n-largest", "129"] }`: options of one experiment only."""
    if not isinstance(args, dict):
        raise SwLensError(f"{where}: 'args' must be a table of experiment = [options]")
    _unknown(args, set(EXPERIMENTS), f"{where} args")
    for experiment, values in args.items():
        for value in _strings(values, f"{where}: args.{experiment}"):
            _one_line(value, f"{where}: args.{experiment}")
    return args


PATH_OPTIONS = ("model", "text", "tokenizer", "registry", "device_map")


def _anchored(options: dict, folder: Path) -> dict:
    """Relative paths in a sweep file are relative to the file, wherever a task runs (a
    SLURM task starts in the checkout); names that are not files there (hub ids, named
    corpora) stay as they are."""
    return options | {
        key: str((folder / options[key]).resolve())
        for key in PATH_OPTIONS
        if key in options
        and not Path(options[key]).is_absolute()
        and (folder / options[key]).exists()
    }


def load_sweep(path: Path | str, out: Path | str | None = None) -> Sweep:
    """Read and check a sweep file; every mistake is one line naming where it is."""
    path = Path(path)
    data = read_toml(path, "sweep file")
    _unknown(data, {"sweep", "slurm", "defaults", "runs"}, f"sweep file '{path}'")
    head = _table(data.get("sweep", {}), f"{path} [sweep]")
    _unknown(head, {"out", "experiments"}, f"{path} [sweep]")
    slurm = _checked_slurm(data.get("slurm", {}), f"{path} [slurm]")
    raw_defaults = _table(data.get("defaults", {}), f"{path} [defaults]")
    defaults = _checked_options(raw_defaults, f"{path} [defaults]")
    default_args = _checked_args(raw_defaults.get("args", {}), f"{path} [defaults]")
    experiments = _strings(head.get("experiments", ["locate"]), f"{path} [sweep] experiments")
    _unknown(experiments, set(EXPERIMENTS), f"{path} [sweep] experiments")
    entries = data.get("runs")
    if not entries:
        raise SwLensError(f"sweep file '{path}' has no [[runs]]")
    if not isinstance(entries, list):
        raise SwLensError(f"{path}: 'runs' must be an array of tables ([[runs]])")
    runs = []
    for i, entry in enumerate(entries):
        where = f"{path} runs[{i}]"
        options = _anchored(defaults | _checked_options(entry, where), path.parent)
        wanted = _strings(entry.get("experiments", experiments), f"{where} experiments")
        _unknown(wanted, set(EXPERIMENTS), f"{where} experiments")
        if "model" not in options:
            raise SwLensError(f"{where}: no 'model'")
        args = default_args | _checked_args(entry.get("args", {}), where)
        name = entry.get("name", options["model"])
        if not isinstance(name, str):
            raise SwLensError(f"{where}: 'name' must be a string, got {name!r:.60}")
        runs.append(Run(i, _slug(name), list(wanted), options, args))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SwLensError(f"{path}: two runs share a name; give each a distinct 'name'")
    # --out is relative to where you are, [sweep] out to the file, like its other paths.
    if out is not None:
        folder = Path(out)
    elif "out" in head:
        where = f"{path} [sweep] out"
        if not isinstance(head["out"], str):
            raise SwLensError(f"{where} must be a string (a folder), got {head['out']!r:.60}")
        folder = path.parent / _one_line(head["out"], where)
    else:
        folder = Path("out") / "sweeps" / _slug(path.stem)
    return Sweep(path.resolve(), folder.resolve(), runs, slurm)


def read_status(sweep: Sweep, run: Run) -> RunStatus | None:
    """A run's status record, None when it has none yet; a record that is not one (edited,
    truncated) is a one-line error naming the file."""
    path = run.folder(sweep.out) / STATUS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise SwLensError(f"run record '{path}' is unreadable: {err}") from None
    return validate(record, RunStatus, f"run record '{path}'")


def finished(sweep: Sweep, run: Run) -> bool:
    status = read_status(sweep, run)
    return bool(status) and status.status == "ok"


def _error_line(stderr: str) -> str:
    """The one-line error a command printed (or its last line of output)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "interrupted:"))]
    return (errors or lines or ["(no output)"])[-1].removeprefix("error: ")


def run_task(sweep: Sweep, index: int, python: str) -> dict:
    """Run one run's experiments one after another (an experiment that fails ends the
    run: the later ones depend on it) and write its ``status.json``."""
    if not 0 <= index < len(sweep.runs):
        raise SwLensError(f"task {index} is not in the sweep (0..{len(sweep.runs) - 1})")
    run = sweep.runs[index]
    folder = run.folder(sweep.out)
    folder.mkdir(parents=True, exist_ok=True)
    steps = []
    status = "ok"
    for experiment, argv in zip(run.experiments, run.commands(sweep.out, python), strict=True):
        start = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True)
        (folder / f"{experiment}.log").write_text(done.stdout + done.stderr)
        step = {
            "experiment": experiment,
            "returncode": done.returncode,
            "seconds": round(time.monotonic() - start, 1),
        }
        if done.returncode:
            step["error"] = _error_line(done.stderr)
            status = "failed"
        steps.append(step)
        if status == "failed":
            break
    document = {"run": asdict(run), "status": status, "steps": steps}
    write_json(folder / STATUS, document)
    return document


def python_and_repo() -> tuple[str, Path]:
    """The interpreter and checkout that tasks run with: the ones running now."""
    return sys.executable, Path(__file__).resolve().parents[1]


# --- SLURM -------------------------------------------------------------------------------

TEMPLATE = files("sw_lens") / "data" / "sweep.sbatch"


def sbatch_lines(sweep: Sweep, indices: list[int]) -> list[str]:
    """The #SBATCH lines of the job array for `indices`, from the sweep's [slurm] table."""
    s = sweep.slurm
    logs = _directive_path(sweep.out / "slurm")
    array = ",".join(str(i) for i in indices)
    if s.get("max_parallel"):
        array += f"%{s['max_parallel']}"
    lines = [
        f"--job-name={s.get('job_name', 'sw_lens-' + _slug(sweep.path.stem))}",
        f"--array={array}",
        f"--output={logs}/%A_%a.out",
        f"--error={logs}/%A_%a.err",
        "--ntasks=1",
    ]
    for key in ("partition", "account", "qos"):
        if key in s:
            lines.append(f"--{key}={s[key]}")
    if "time" in s:
        lines.append(f"--time={s['time']}")
    if s.get("gpus_per_task"):
        lines.append(f"--gpus-per-task={s['gpus_per_task']}")
    if "cpus_per_task" in s:
        lines.append(f"--cpus-per-task={s['cpus_per_task']}")
    if "mem" in s:
        lines.append(f"--mem={s['mem']}")
    lines += list(s.get("extra", []))
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(sweep: Sweep, indices: list[int], python: str, repo: Path) -> str:
    """The repository's sbatch template with this sweep's #SBATCH lines, setup lines and
    task command filled in."""
    setup = sweep.slurm.get("setup", [])  # one line each, checked by load_sweep
    fill = {
        "@SBATCH@": "\n".join(sbatch_lines(sweep, indices)),
        "@SETUP@": "\n".join(setup) or "# (no setup lines in the sweep file)",
        "@REPO@": _quote(str(repo), "the sw_lens checkout's path"),
        "@PYTHON@": _quote(python, "the Python interpreter's path"),
        "@SWEEP@": _quote(str(sweep.path), "the sweep file's path"),
        "@OUT@": _quote(str(sweep.out), "the sweep's output folder"),
    }
    # One pass: a marker inside a filled-in value is left as it is.
    return re.sub("|".join(fill), lambda m: fill[m.group(0)], TEMPLATE.read_text())


def _quote(text: str, what: str) -> str:
    """One shell word: single-quoted, and refused if it could still start a new line."""
    _one_line(text, what)
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _directive_path(path: Path) -> Path:
    """A path for an #SBATCH line, which sbatch (not the shell) splits at blanks and in
    which SLURM expands % patterns: refused unless plainly one word."""
    if re.search(r"[\s\"'\\%\x00-\x1f\x7f]", str(path)):
        raise SwLensError(
            f"the sweep's output folder '{path}' has blanks, quotes, backslashes or '%', "
            f"which #SBATCH lines cannot hold: choose another --out"
        )
    return path


def submit(
    sweep: Sweep, indices: list[int], extra: list[str], wait: bool, python: str, repo: Path
) -> str:
    """Write the filled sbatch script into the sweep folder and submit it; returns the job
    id. The log folder exists before submission (SLURM does not create it)."""
    logs = sweep.out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    write_json(sweep.out / "sweep.json", sweep.to_dict())
    script = write_atomic(
        logs / "sweep.sbatch",
        lambda tmp: tmp.write_text(render_sbatch(sweep, indices, python, repo)),
    )
    argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), *extra, str(script)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SwLensError("sbatch is not on PATH: is this a SLURM login node?") from None
    if done.returncode and not (wait and done.stdout.strip()):
        raise SwLensError(f"sbatch failed: {_error_line(done.stderr)}")
    job = done.stdout.strip().splitlines()[0].split(";")[0]
    record = logs / "submissions.jsonl"
    entry = {"job_id": job, "tasks": indices, "sbatch": argv, "time": time.time()}
    with record.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return job


# --- report ------------------------------------------------------------------------------

COLUMNS = [
    "run",
    "model",
    "status",
    "layer",
    "row",
    "col",
    "value",
    "super_activation",
    "baseline_ppl",
    "ablated_ppl",
    "ratio",
    "n_layers",
    "protocol",
    "error",
]


def collect(out: Path) -> tuple[list[dict], SweepPlan]:
    """One row per super weight of every finished run (one row for a run with none), and
    one row per failed, missing or unreadable run; with the sweep's plan."""
    plan_path = Path(out) / "sweep.json"
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SwLensError(f"'{out}' is not a sweep folder: no sweep.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise SwLensError(f"sweep plan '{plan_path}' is unreadable: {err}") from None
    plan = validate(plan, SweepPlan, f"sweep plan '{plan_path}'")
    # The plan's own folder is where its runs are: the report reads `out`, wherever the
    # plan says it was written.
    runs = [Run(**r.model_dump()) for r in plan.runs]
    sweep = Sweep(Path(plan.sweep_file), Path(out), runs)
    rows = []
    for run in sweep.runs:
        base = {"run": run.name, "model": run.options["model"]}
        try:
            status = read_status(sweep, run)
            if status is None:
                rows.append(base | {"status": "missing"})
            elif status.status != "ok":
                failed = next(s for s in status.steps if s.returncode)
                error = f"{failed.experiment}: {failed.error or ''}"
                rows.append(base | {"status": "failed", "error": error})
            else:
                rows += _locate_rows(run.folder(sweep.out) / "results.json", base)
        except SwLensError as err:
            rows.append(base | {"status": "invalid", "error": str(err)})
    return rows, plan


def _locate_rows(path: Path, base: dict) -> list[dict]:
    if not path.is_file():
        return [base | {"status": "ok"}]
    doc = read_json(path, kind="locate")
    baseline = doc.perplexity.baseline
    ablated = {tuple(w.key() for w in a.weights): a for a in doc.perplexity.ablations}
    common = base | {
        "status": "ok",
        "baseline_ppl": baseline.perplexity,
        "n_layers": doc.model.n_layers,
        "protocol": baseline.protocol_description,
    }
    if not doc.super_weights:
        return [common | {"error": "no super weight found"}]
    rows = []
    for c in doc.super_weights:
        alone = ablated.get((c.key(),))
        rows.append(
            common
            | {
                "layer": c.layer,
                "row": c.row,
                "col": c.col,
                "value": c.value,
                "super_activation": c.output_activation.value,
                "ablated_ppl": alone and alone.perplexity,
                "ratio": alone and alone.ratio,
            }
        )
    return rows


def _inert(value):
    """A text cell a spreadsheet will not run as a formula (a model named '=HYPERLINK(...)'),
    on one line; numbers stay numbers."""
    if not isinstance(value, str):
        return value
    value = " ".join(value.splitlines())
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _inert(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def table_markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return " ".join(str(value).splitlines()).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"
