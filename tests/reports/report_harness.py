"""Run the report commands in-process through a parser shaped like exporter/cli.py's (the same
common flags), and build databases of known content."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from exporter.cli import _common
from exporter.demo.servers import PostgresCluster
from exporter.reports import add_commands


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="pgcache-exporter")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command")
    handlers = add_commands(sub, lambda p: _common(p, suppress=True))
    args = parser.parse_args(argv)
    capsys.readouterr()
    code = handlers[args.command](args)
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
