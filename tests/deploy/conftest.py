"""Fixtures for the deploy tests: the wheel and sdist built from exactly what the Dockerfile's
builder stage sees, installed into a clean venv (no system site-packages, no editable install), so
every example config shipped is checked by the packaged program, not by the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from deploy_files import REPO, Dist, Installed, builder_context_files


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
