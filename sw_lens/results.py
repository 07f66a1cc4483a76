"""Results as versioned JSON documents, with provenance, written atomically.

Every document is typed (`sw_lens.documents`: a study's dict becomes its type, `typed`),
carries its schema version and the package versions and git commit that produced it, and
is written to a temporary file in the target directory and renamed, so an interrupted
run leaves the previous file or none, never half of one. A run's files
(its document and every figure) are written together: into a staging folder first, and
moved into place only once all of them exist (`staged_folder`).
"""

import json
import os
import platform
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from sw_lens.documents import SCHEMA_VERSION, Header, parse
from sw_lens.errors import SwLensError

_UMASK = os.umask(0)
os.umask(_UMASK)
_VERSIONED = ["sw_lens", "torch", "transformers", "transformer-lens", "tokenizers", "gguf"]


def package_versions() -> dict[str, str]:
    """Versions of the installed packages whose behaviour the numbers depend on."""
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """Commit of the sw_lens checkout, with ``-dirty`` when it has local changes; None when
    sw_lens is not running from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
    }


def header(kind: str, loaded, seed: int) -> dict:
    """What every results document starts with (`documents.Header`): the schema version,
    the kind, the model as `LoadedModel.description` says it, and provenance."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "model": loaded.description(),
        "provenance": provenance(loaded.device, loaded.dtype, seed),
    }


def to_jsonable(obj):
    """Dataclasses, tuples and tensors-free structures to plain JSON types."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        raise TypeError("tensors are not serialised into results; summarise them first")
    return obj


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def check_writable(folder: Path) -> Path:
    """Fail now, before minutes of work, if results could not be written into `folder`
    (an existing file in the way, a read-only or missing parent). Probes by creating and
    removing a temporary folder, as permission bits say nothing to root; creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SwLensError(f"output folder '{folder}' is an existing file")
    existing = next(p for p in [folder.absolute(), *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise SwLensError(f"cannot create output folder '{folder}': '{existing}' is a file")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".sw_lens-probe-").cleanup()
    except OSError as err:
        raise SwLensError(f"cannot write output folder '{folder}': {_reason(err)}") from None
    return folder


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder inside `out` to write a run's files into. When the block ends
    without an error every file is moved into `out` (renames: instant, nothing copied);
    otherwise the staging folder is deleted, and `out` is as it was (not even created).
    A full disk or a read-only folder is a one-line error."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    except OSError as err:
        raise SwLensError(f"cannot write results into '{out}': {_reason(err)}") from None
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    except OSError as err:
        raise SwLensError(f"cannot write results into '{out}': {_reason(err)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _json(document: dict) -> str:
    try:
        return json.dumps(to_jsonable(document), indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise SwLensError("the results hold NaN or inf: nothing was written") from None


def typed(document: dict) -> Header:
    """A study's new document as its type (`sw_lens.documents`), checked exactly as a read
    checks it: what we write is what we accept."""
    return parse(
        json.loads(_json(document)), f"the new {document['kind']} document", {document["kind"]}
    )


def write_json(path: Path, document: Header | dict) -> Path:
    """A typed results document, or a plain one (a sweep's plan and status records)."""
    text = document.to_json() if isinstance(document, Header) else _json(document)
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path, kind: str | set[str]) -> Header:
    """A results document of `kind` (or one of several kinds) as its type, checked against
    its schema (`sw_lens.documents`), or a one-line error."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SwLensError(f"results file '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise SwLensError(f"results file '{path}' is not valid JSON: {err}") from None
    except (IsADirectoryError, PermissionError) as err:
        raise SwLensError(f"cannot read results file '{path}': {err.strerror}") from None
    kinds = {kind} if isinstance(kind, str) else kind
    return parse(document, f"results file '{path}'", kinds)


def read_toml(path: Path, what: str) -> dict:
    """A TOML file (a registry, a sweep file), or a one-line error naming it as `what`."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SwLensError(f"{what} '{path}' does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SwLensError(f"{what} '{path}' is not valid TOML: {err}") from None
