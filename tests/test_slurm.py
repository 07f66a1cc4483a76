"""A 3-task sweep through a real SLURM controller: two runs finish, one fails alone.

The cluster is the one-node localhost cluster `.ci/slurm.sh up` starts (and `.ci/run`
tears down by PID on exit, also when this test fails); $SW_LENS_SLURM_STATE names its
folder. Where no cluster could be set up, the test is skipped with the reason."""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ONE, build, run_experiment, save
from test_sweep import three_runs, write_sweep

from sw_lens.sweep import load_sweep


def cluster() -> dict:
    """The environment that points SLURM commands at the test cluster, or a skip."""
    state = os.environ.get("SW_LENS_SLURM_STATE")
    if not state:
        pytest.skip("no SLURM test cluster: .ci/run starts one with .ci/slurm.sh (root + apt)")
    reason = Path(state) / "skip-reason"
    if reason.is_file():
        pytest.skip(f"no SLURM test cluster: {reason.read_text().strip()}")
    env = {"SLURM_CONF": str(Path(state) / "slurm.conf")}
    sinfo = ["sinfo", "-h", "-o", "%T"]
    done = subprocess.run(sinfo, capture_output=True, text=True, env=os.environ | env)
    assert done.stdout.strip() == "idle", done.stderr
    return env


def report(out: Path) -> dict[str, dict]:
    done = run_experiment("sweep.py", "report", out)
    assert done.returncode == 0, done.stderr
    with (out / "report.csv").open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_a_sweep_runs_as_a_slurm_job_array(tmp_path):
    env = cluster()
    save(build("llama", [ONE]), tmp_path / "tiny-llama")
    save(build("gpt2", [ONE]), tmp_path / "tiny-gpt2")
    path = write_sweep(tmp_path, three_runs(tmp_path), {"time": "00:10:00", "mem": "1G"})
    args = ["slurm", path, "--wait", "--", "--comment=sw_lens-ci"]
    done = run_experiment("sweep.py", *args, env=env)
    assert done.returncode == 0, done.stderr
    sweep = load_sweep(path)
    logs = sweep.out / "slurm"
    (submission,) = map(json.loads, (logs / "submissions.jsonl").read_text().splitlines())
    assert submission["tasks"] == [0, 1, 2] and "--comment=sw_lens-ci" in submission["sbatch"]
    job = submission["job_id"]
    assert sorted(p.name for p in logs.glob("*.out")) == [f"{job}_{i}.out" for i in range(3)]

    rows = report(sweep.out)
    statuses = [rows[name]["status"] for name in ("tiny-llama", "no-such-model", "tiny-gpt2")]
    assert statuses == ["ok", "failed", "ok"]
    for name in ("tiny-llama", "tiny-gpt2"):
        row = rows[name]
        assert (row["layer"], row["row"], row["col"]) == ("1", "5", "17")
        assert float(row["ablated_ppl"]) / float(row["baseline_ppl"]) == pytest.approx(
            float(row["ratio"]), rel=1e-6
        )
    assert "model path" in rows["no-such-model"]["error"]

    # --resume submits only the run without a finished result.
    done = run_experiment("sweep.py", "slurm", path, "--resume", "--wait", env=env)
    assert done.returncode == 0, done.stderr
    assert "tasks 1" in done.stdout
    assert report(sweep.out)["no-such-model"]["status"] == "failed"
