"""Open a page in a real headless browser (Debian's chromium, installed by .ci/chromium.sh):
the DOM after its scripts ran, and every console message it printed."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\] (.*)")


def chromium() -> str:
    """The chromium binary, or skip with the reason CI recorded when it could not install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason_file = Path(os.environ.get("SW_LENS_CHROMIUM_SKIP", "/nonexistent"))
    reason = reason_file.read_text().strip() if reason_file.is_file() else ""
    pytest.skip(f"no chromium: {reason or 'not installed (.ci/chromium.sh installs it)'}")


def open_page(path: Path, budget_ms: int = 5000) -> tuple[str, list[str]]:
    """(serialized DOM once scripts have run, console messages). Offline: the network is
    disabled by a proxy that does not exist, so a page that needs a CDN renders nothing."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--proxy-server=127.0.0.1:9",
            "--enable-logging=stderr",
            "--v=0",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            Path(path).resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [m.group(1) for m in CONSOLE.finditer(done.stderr)]
