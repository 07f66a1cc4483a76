"""Results are versioned, carry provenance, and are written atomically."""

import json

import pytest
import torch

from sw_lens.documents import SCHEMA_VERSION
from sw_lens.errors import SwLensError
from sw_lens.results import provenance, read_json, write_json


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "locate", "x": (1, 2)})
    assert json.loads(path.read_text()) == {"schema_version": 2, "kind": "locate", "x": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "locate", "v": 1})
    with pytest.raises(SwLensError, match="NaN or inf: nothing was written"):
        write_json(path, {"v": float("nan")})  # not valid JSON: refused, nothing half-written
    with pytest.raises(TypeError):
        write_json(path, {"v": torch.zeros(2)})
    assert json.loads(path.read_text())["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_reading_checks_schema_version_and_kind(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema_version": 0, "kind": "locate"}))
    with pytest.raises(SwLensError, match="schema_version 0; this sw_lens reads 2"):
        read_json(path, "locate")
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "sweep"}))
    with pytest.raises(SwLensError, match="holds 'sweep', not 'locate'"):
        read_json(path, "locate")
    path.write_text("{not json")
    with pytest.raises(SwLensError, match="is not valid JSON"):
        read_json(path, "locate")


def test_provenance_records_versions_device_dtype_and_commit():
    record = provenance(torch.device("cpu"), torch.bfloat16, seed=7)
    assert record["versions"]["torch"] == torch.__version__
    assert {"transformers", "transformer-lens", "sw_lens"} <= set(record["versions"])
    assert (record["device"], record["dtype"], record["seed"]) == ("cpu", "bfloat16", 7)
    assert record["git_commit"] is None or len(record["git_commit"].split("-")[0]) == 40
