"""Derive copies of alerts.yml: a fast-acting one for end-to-end tests and demos, and one with
your own runbook and Grafana links.

Shortened: every `for:` becomes FOR and every range selector (`[5m]`, `[1h]`) becomes WINDOW;
expressions, thresholds, labels and annotations stay exactly as written, so the test exercises
the real rules. Rebased: every runbook_url starts with --runbook-base instead of RUNBOOK_BASE and
every dashboard_url with --grafana-url instead of GRAFANA_URL.

    python deploy/prometheus/short_rules.py [--for 2s] [--window 10s] alerts.yml > short.yml
    python deploy/prometheus/short_rules.py --full --runbook-base https://wiki.example/pgcache \
        --grafana-url https://grafana.example alerts.yml > my-alerts.yml
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GRAFANA_URL", "RUNBOOK_BASE", "dump", "rebase", "shorten", "shorten_file"]

# A PromQL range selector: one or more <number><unit> pairs in brackets (`[5m]`, `[1h30m]`).
RANGE = re.compile(r"\[\s*(?:\d+(?:ms|[smhdwy]))+\s*\]")

# The link bases alerts.yml is written with: the runbook (docs/dashboards-and-alerts.md as
# published) and the Grafana that serves grafana/dashboards (the compose stack's).
RUNBOOK_BASE = "https://github.com/pgcache-exporter/pgcache-exporter/blob/main/docs/dashboards-and-alerts.md"
GRAFANA_URL = "http://localhost:3000"


def rebase(doc: dict[str, Any], *, runbook_base: str | None = None, grafana_url: str | None = None) -> dict[str, Any]:
    """A copy of a rules document whose runbook_url and dashboard_url use other bases."""
    out: dict[str, Any] = {"groups": []}
    for group in doc["groups"]:
        rules = []
        for rule in group["rules"]:
            rule = dict(rule)
            ann = dict(rule.get("annotations", {}))
            for key, old, new in (("runbook_url", RUNBOOK_BASE, runbook_base),
                                  ("dashboard_url", GRAFANA_URL, grafana_url)):
                if new is None or key not in ann:
                    continue
                if not ann[key].startswith(old):
                    raise ValueError(f"{rule.get('alert')}: {key} does not start with {old}")
                ann[key] = new.rstrip("/") + ann[key][len(old):]
            if ann:
                rule["annotations"] = ann
            rules.append(rule)
        out["groups"].append({**group, "rules": rules})
    return out


def shorten(doc: dict[str, Any], *, for_: str = "2s", window: str = "10s") -> dict[str, Any]:
    """A copy of a rules document with short `for:` and range windows."""
    out: dict[str, Any] = {"groups": []}
    for group in doc["groups"]:
        rules = []
        for rule in group["rules"]:
            rule = dict(rule)
            if "[" in rule["expr"]:
                if re.search(r"\[[^\]]*:", rule["expr"]):
                    raise ValueError(f"{rule.get('alert') or rule.get('record')}: subqueries are not shortened")
                rule["expr"] = RANGE.sub(f"[{window}]", rule["expr"])
            if "for" in rule:
                rule["for"] = for_
            rules.append(rule)
        out["groups"].append({**group, "rules": rules})
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, so the generated file reads like the source."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000)


def shorten_file(src: Path, dest: Path, *, for_: str = "2s", window: str = "10s") -> Path:
    doc = yaml.safe_load(src.read_text())
    dest.write_text(
        f"# Generated from {src.name} by short_rules.py (for: {for_}, range windows {window}). "
        "Do not edit.\n"
        + dump(shorten(doc, for_=for_, window=window))
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rules", type=Path, nargs="?", default=Path(__file__).with_name("alerts.yml"))
    ap.add_argument("--for", dest="for_", default="2s")
    ap.add_argument("--window", default="10s")
    ap.add_argument("--full", action="store_true", help="keep the real for: and windows (only rebase links)")
    ap.add_argument("--runbook-base", help=f"replaces {RUNBOOK_BASE} in every runbook_url")
    ap.add_argument("--grafana-url", help=f"replaces {GRAFANA_URL} in every dashboard_url")
    args = ap.parse_args(argv)
    doc = yaml.safe_load(args.rules.read_text())
    doc = rebase(doc, runbook_base=args.runbook_base, grafana_url=args.grafana_url)
    if not args.full:
        doc = shorten(doc, for_=args.for_, window=args.window)
    sys.stdout.write(dump(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
