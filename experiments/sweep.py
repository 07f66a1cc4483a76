"""Sweeps over many models, locally or as a SLURM job array, and one report at the end.

  sweep.py plan SWEEP            the runs of a sweep file, with what is finished
  sweep.py local SWEEP           run them one after another on this machine
  sweep.py slurm SWEEP [-- ...]  submit one job array (one task per run); options after
                                 `--` go to sbatch as they are
  sweep.py report OUT            one table (CSV, Markdown) and a figure from every run

`--resume` (local, slurm) skips runs that already finished. The sweep file format is
described in sw_lens/sweep.py; sw_lens/data/sweep.sbatch is the task script.
"""

import argparse
from pathlib import Path

from experiments._cli import Parser, check_interrupted, publish, run
from sw_lens.errors import SwLensError
from sw_lens.figures import sweep_figure
from sw_lens.results import check_writable, write_atomic, write_json
from sw_lens.sweep import (
    collect,
    finished,
    load_sweep,
    python_and_repo,
    read_status,
    render_sbatch,
    run_task,
    submit,
    table_csv,
    table_markdown,
)


def parse_args() -> argparse.Namespace:
    p = Parser(description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "local", "slurm", "task"):
        sub = commands.add_parser(name)
        sub.add_argument("sweep", type=Path, help="sweep file (TOML)")
        sub.add_argument("--out", type=Path, help="output folder (default: the sweep file's)")
        if name in ("local", "slurm"):
            sub.add_argument("--resume", action="store_true", help="skip finished runs")
        if name == "slurm":
            sub.add_argument("--wait", action="store_true", help="sbatch --wait")
            sub.add_argument("--dry-run", action="store_true", help="write the script only")
        if name == "task":
            sub.add_argument("index", type=int, help="run index (SLURM_ARRAY_TASK_ID)")
    report = commands.add_parser("report")
    report.add_argument("out", type=Path, help="a sweep's output folder")
    args, rest = p.parse_known_args()
    # Everything after `--` goes to sbatch untouched (argparse would parse it).
    if rest and (args.command != "slurm" or rest[0] != "--"):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.sbatch_args = rest[1:]
    return args


def plan(sweep) -> None:
    print(f"sweep {sweep.path}: {len(sweep.runs)} runs, results in {sweep.out}")
    for r in sweep.runs:
        status = read_status(sweep, r)
        state = status.status if status else "not run"
        options = " ".join(f"{k}={v}" for k, v in r.options.items() if k != "model")
        print(
            f"  {r.index:>3} {r.name:<24} {r.options['model']:<28} "
            f"{','.join(r.experiments):<18} {state:<8} {options}"
        )


def pending(sweep, resume: bool) -> list[int]:
    indices = [r.index for r in sweep.runs if not (resume and finished(sweep, r))]
    if not indices:
        print("every run has finished; nothing to do")
    return indices


def main() -> None:
    args = parse_args()
    if args.command == "report":
        rows, _ = collect(args.out)
        markdown = table_markdown(rows)

        def write(folder: Path) -> list[Path]:
            return [
                write_atomic(folder / "report.csv", lambda tmp: tmp.write_text(table_csv(rows))),
                write_atomic(folder / "report.md", lambda tmp: tmp.write_text(markdown)),
                *sweep_figure(rows, folder),
            ]

        figures = publish(check_writable(args.out), write)[2:]
        print(markdown)
        for r in rows:
            if r["status"] != "ok":
                print(f"{r['status']}: {r['run']} ({r['model']}) {r.get('error') or ''}")
        print(f"wrote {args.out / 'report.csv'}, report.md and {len(figures)} figure files")
        return
    sweep = load_sweep(args.sweep, args.out)
    if args.command in ("local", "slurm"):
        check_writable(sweep.out)
    python, repo = python_and_repo()
    if args.command == "plan":
        plan(sweep)
    elif args.command == "task":
        status = run_task(sweep, args.index, python)
        print(f"run {args.index}: {status['status']}")
        if status["status"] != "ok":
            step = status["steps"][-1]
            raise SwLensError(f"run {args.index}, {step['experiment']}: {step.get('error')}")
    elif args.command == "local":
        write_json(sweep.out / "sweep.json", sweep.to_dict())
        for index in pending(sweep, args.resume):
            check_interrupted()
            status = run_task(sweep, index, python)
            print(f"run {index} ({sweep.runs[index].name}): {status['status']}")
    elif args.command == "slurm":
        indices = pending(sweep, args.resume)
        if not indices:
            return
        if args.dry_run:
            print(render_sbatch(sweep, indices, python, repo))
            return
        job = submit(sweep, indices, args.sbatch_args, args.wait, python, repo)
        print(f"submitted job array {job}: tasks {','.join(map(str, indices))}")
        print(
            f"logs in {sweep.out / 'slurm'}; then: python experiments/sweep.py report {sweep.out}"
        )


if __name__ == "__main__":
    run(main)
