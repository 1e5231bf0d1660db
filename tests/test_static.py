"""Static checks belong to the one test command: ruff on everything, mypy --strict on exporter/."""

from __future__ import annotations

import subprocess
import sys

from metrics_text import REPO


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cache_library_imports_without_daemon_dependencies() -> None:
    code = (
        "import sys, exporter.cache\n"
        "heavy = {'aiohttp', 'apscheduler', 'sqlalchemy'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
