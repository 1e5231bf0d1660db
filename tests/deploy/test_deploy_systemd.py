"""deploy/systemd: `systemd-analyze verify` on the unit (pointed at the clean venv's console script),
its sandbox exposure score, the keys the sandbox relies on, and the environment file example."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_files import REPO, SYSTEMD, Installed

from exporter.cli import build_parser
from exporter.config import load_config

UNIT = SYSTEMD / "pgcache-exporter.service"
ENV_FILE = SYSTEMD / "pgcache-exporter.env"
INSTALLED_AT = "/opt/pgcache-exporter/bin/pgcache-exporter"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install Debian's `systemd` package")
    return exe


def _service_keys() -> dict[str, list[str]]:
    """[Service] keys with every value (systemd allows a key more than once)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def _env() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string("[env]\n" + ENV_FILE.read_text())
    return dict(parser["env"])


def _unit_for_test(installed: Installed, tmp_path: Path) -> Path:
    """The unit with its paths pointed at files that exist here: the installed wheel's script."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_AT} " in text and "EnvironmentFile=/etc/pgcache-exporter/pgcache-exporter.env" in text
    text = text.replace(INSTALLED_AT, str(installed.exe))
    text = text.replace("/etc/pgcache-exporter/pgcache-exporter.env", str(ENV_FILE))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_systemd_analyze_verify_is_clean(installed: Installed, tmp_path: Path) -> None:
    unit = _unit_for_test(installed, tmp_path)
    r = subprocess.run([_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # An unknown or misspelt key is only a warning: any output counts as a failure.
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_sandbox_exposure_is_low(installed: Installed, tmp_path: Path) -> None:
    unit = _unit_for_test(installed, tmp_path)
    r = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    # Exposure 0 (locked down) .. 10 (unprotected); --threshold is in tenths.
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_unit_keys_the_sandbox_relies_on() -> None:
    keys = _service_keys()
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "", "RestartPreventExitStatus": "2", "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    for key, value in expected.items():
        assert keys.get(key) == [value], f"{key}={keys.get(key)}"
    assert keys["MemoryMax"][0].rstrip("MG").isdigit()
    assert "@system-service" in keys["SystemCallFilter"]


def test_exec_start_is_the_console_script_with_valid_flags() -> None:
    (exec_start,) = _service_keys()["ExecStart"]
    words = shlex.split(exec_start)
    assert words[0] == INSTALLED_AT and Path(words[0]).name == "pgcache-exporter"
    flags = shlex.split(_env()["PGCACHE_FLAGS"])
    argv = [w for w in words[1:] if w != "$PGCACHE_FLAGS"] + flags
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.listen_address == ":19187"


def test_env_example_configures_the_exporter(installed: Installed) -> None:
    env = _env()
    assert all(k.startswith("PGCACHE_") for k in env), sorted(env)
    # Without a config file: the environment alone.
    no_file = load_config(None, env=env)
    assert [t.name for t in no_file.postgres] == ["127.0.0.1:5432/postgres"]
    assert [t.name for t in no_file.redis] == ["127.0.0.1:6379"]
    # With the config file it names (config.example.yaml, installed there): the packaged program.
    assert env["PGCACHE_CONFIG_FILE"] == "/etc/pgcache-exporter/config.yaml"
    r = installed.run("check-config", str(REPO / "config.example.yaml"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
