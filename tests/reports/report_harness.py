"""Run the report commands in-process through the real command line (exporter.cli.main), and
build databases of known content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.cli import main
from exporter.demo.servers import PostgresCluster


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse rejecting a flag value
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def fresh_database(pg: PostgresCluster, name: str, setup: str) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {name}")
    pg.psql(setup, db=name)
    return name


def drop_database(pg: PostgresCluster, name: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
