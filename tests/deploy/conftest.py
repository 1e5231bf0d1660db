"""Fixtures for the deploy tests: the wheel and sdist built from exactly what the Dockerfile's
builder stage sees, installed into a clean venv (no system site-packages, no editable install), so
every example config shipped is checked by the packaged program, not by the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_files import REPO, builder_context_files


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    """The console script of the wheel installed into a clean venv."""

    venv: Path
    exe: Path

    def run(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # A minimal environment: nothing from this venv or the repo leaks into the installed program.
        base = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                "LANG": "C.UTF-8"}
        return subprocess.run([str(self.exe), *args], env={**base, **(env or {})}, cwd=cwd or self.venv,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """`python -m build` (sdist, then the wheel from the sdist) on a copy of the Docker build
    context's builder inputs: if the Dockerfile forgets a file the wheel needs, this fails."""
    ctx = tmp_path_factory.mktemp("docker-context")
    for rel in builder_context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ctx)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"python -m build failed (pip install build):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return Dist(sdist=sdists[0], wheel=wheels[0])


@pytest.fixture(scope="session")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A clean venv with the wheel; dependencies come from the configured package index."""
    venv = tmp_path_factory.mktemp("clean-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input", str(dist.wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, f"installing the wheel into a clean venv failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    exe = venv / "bin" / "pgcache-exporter"
    assert exe.is_file(), "the wheel installs no pgcache-exporter console script"
    yield Installed(venv=venv, exe=exe)
