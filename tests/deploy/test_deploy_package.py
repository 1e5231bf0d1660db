"""The package and the container image: the wheel and sdist build from the Docker build context,
install into a clean venv and run; the Dockerfile's stages, user, port, healthcheck and entry point
agree with the package (no Docker engine here, so the image itself is not built)."""

from __future__ import annotations

import ast
import json
import re
import shlex
import socket
import subprocess
import tarfile
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

from deploy_files import (
    REPO,
    SYSTEMD,
    Dist,
    Installed,
    copy_sources,
    dockerfile_stages,
    in_build_context,
)

from exporter import __version__

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPT = "pgcache-exporter"
EXAMPLE_ENV = {  # what the systemd environment file example sets (checked in test_deploy_systemd)
    "PGCACHE_POSTGRES_DSN": "postgresql://pgcache_exporter:change-me@127.0.0.1:5432/postgres",
    "PGCACHE_REDIS_URL": "redis://127.0.0.1:6379/0",
}


# -- the package ---------------------------------------------------------------------------------


def test_wheel_and_sdist_carry_the_version_from_exporter_init(dist: Dist) -> None:
    assert dist.wheel.name == f"pgcache_exporter-{__version__}-py3-none-any.whl"
    assert dist.sdist.name == f"pgcache_exporter-{__version__}.tar.gz"
    with zipfile.ZipFile(dist.wheel) as whl:
        names = whl.namelist()
        entry_points = whl.read(f"pgcache_exporter-{__version__}.dist-info/entry_points.txt").decode()
    assert f"{SCRIPT} = exporter.cli:main" in entry_points
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    # Every module of the source tree is in the wheel (a subpackage missing from `packages.find`
    # would only fail at run time).
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "exporter").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    with tarfile.open(dist.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "exporter/cli.py"} <= members


def test_installed_wheel_runs_from_its_own_venv(installed: Installed) -> None:
    r = installed.run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pgcache-exporter {__version__}"
    # The program imports the installed copy, not the repository's.
    py = installed.venv / "bin" / "python"
    where = subprocess.run([str(py), "-c", "import exporter; print(exporter.__file__)"],
                           capture_output=True, text=True, cwd=installed.venv, check=True).stdout
    assert str(installed.venv) in where and str(REPO) not in where


def test_check_config_accepts_config_example(installed: Installed) -> None:
    r = installed.run("check-config", str(REPO / "config.example.yaml"), env=EXAMPLE_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK (1 PostgreSQL and 1 Redis target(s))" in r.stdout


def test_check_config_rejects_a_broken_config(installed: Installed, tmp_path: Path) -> None:
    # The command used on every example must be able to fail: exit 2 and the key named.
    bad = tmp_path / "bad.yaml"
    bad.write_text("collectors:\n  statements: {interval: fast}\n")
    r = installed.run("check-config", str(bad))
    assert r.returncode == 2 and "collectors.statements.interval" in r.stderr, r.stderr


# -- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    assert final.base == "python:3.11-slim"
    # The image's Python satisfies requires-python (and is the same in both stages: the venv is copied).
    assert builder.base == final.base
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    build_runs = " ".join(builder.all("RUN"))
    assert "-m build --wheel" in build_runs and "pip install /dist/*.whl" in build_runs
    # The final stage installs nothing: no pip, apt or build tools, only the builder's venv.
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|apk|gcc|make|build)\b", run), run
    copies = [copy_sources(a) for a in final.all("COPY")]
    assert (["/opt/pgcache-exporter"], "/opt/pgcache-exporter", {"from": "builder"}) in copies


def test_dockerfile_copies_only_files_in_the_build_context() -> None:
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            sources, _, flags = copy_sources(args)
            if "from" in flags:
                continue
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: no such file"
                assert in_build_context(src), f"COPY {src}: excluded by .dockerignore"
    # and the context leaves out what must never reach an image
    for rel in (".venv/bin/python", ".git/config", "tests/conftest.py", "deploy/systemd/pgcache-exporter.env",
                "exporter/__pycache__/cli.cpython-311.pyc"):
        assert not in_build_context(rel), f"{rel} would be sent to the Docker daemon"


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    final = dockerfile_stages()[-1]
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "run as a fixed non-root uid (Kubernetes runAsUser names it)"
    assert final.all("EXPOSE") == ["19187"]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == [SCRIPT]
    assert PYPROJECT["project"]["scripts"] == {SCRIPT: "exporter.cli:main"}
    (cmd,) = final.all("CMD")
    from exporter.cli import build_parser
    build_parser().parse_args(json.loads(cmd))  # a valid command line for the console script
    (env,) = [e for e in final.all("ENV") if "PATH=" in e]
    assert "PATH=/opt/pgcache-exporter/bin:" in env and "PYTHONDONTWRITEBYTECODE=1" in env


def _healthcheck_code() -> str:
    (hc,) = dockerfile_stages()[-1].all("HEALTHCHECK")
    exec_form = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"], "slim has no curl: the check must be Python"
    ast.parse(exec_form[2])
    return exec_form[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthcheck_command_passes_against_the_installed_exporter(installed: Installed, tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run by the clean venv's python against the installed program
    (its targets unreachable: /healthz answers while the process runs)."""
    code = _healthcheck_code()
    env_line = next(e for e in dockerfile_stages()[-1].all("ENV") if "PGCACHE_HEALTHCHECK_URL=" in e)
    assert "PGCACHE_HEALTHCHECK_URL=http://127.0.0.1:19187/healthz" in shlex.split(env_line)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    py = str(installed.venv / "bin" / "python")
    env = {"PGCACHE_POSTGRES_DSN": "postgresql://nobody@127.0.0.1:1/none", "PGCACHE_REDIS_URL": "redis://127.0.0.1:1/0"}
    base = {"PATH": f"{installed.venv / 'bin'}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    log = tmp_path / "exporter.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(installed.exe), "run", f"--web.listen-address=127.0.0.1:{port}"],
                                env={**base, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, f"the exporter exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, "the exporter did not answer /healthz within 20 s"
                time.sleep(0.2)
        ok = subprocess.run([py, "-c", code], env={**base, "PGCACHE_HEALTHCHECK_URL": url},
                            capture_output=True, text=True, timeout=10)
        assert ok.returncode == 0, ok.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0, f"SIGTERM (docker stop) must end the exporter cleanly:\n{log.read_text()}"
    down = subprocess.run([py, "-c", code], env={**base, "PGCACHE_HEALTHCHECK_URL": url},
                          capture_output=True, text=True, timeout=10)
    assert down.returncode != 0, "the healthcheck must fail when nothing answers"


def test_systemd_env_example_sets_what_the_tests_assume() -> None:
    env = dict(line.split("=", 1) for line in (SYSTEMD / "pgcache-exporter.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert {k: env[k] for k in EXAMPLE_ENV} == EXAMPLE_ENV
