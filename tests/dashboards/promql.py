"""What the dashboard and rule tests need to know about PromQL text, without a PromQL parser:
the queries of a dashboard, Grafana's variables filled in, and the metric selectors an expression
names. Parsing itself is left to promtool (`promtool_parses`)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "grafana" / "dashboards"
PROMETHEUS = REPO / "deploy" / "prometheus"
EXPOSED_FILE = Path(__file__).with_name("exposed_metrics.json")

# Series Prometheus itself adds to every scrape; the exporter dashboard shows some of them.
SCRAPE_SERIES = {
    "up": "gauge",
    "scrape_duration_seconds": "gauge",
    "scrape_samples_scraped": "gauge",
}

# Grafana's built-in variables, with values that suit a short end-to-end run as well.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "5s", "$__range": "1m"}

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan", "atan2",
}
FUNCTION_ARGS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
RANGE_FUNCS = ("rate", "irate", "increase")
GAUGE_FUNCS = ("delta", "deriv", "predict_linear", "idelta")


def exposed() -> dict[str, dict[str, Any]]:
    """The families the exporter exposes (name -> type, labels, min_postgres), as in the fixture."""
    data = json.loads(EXPOSED_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def series_types() -> dict[str, str]:
    """Every series name a query may use -> the type of its family (histogram series included)."""
    out = dict(SCRAPE_SERIES)
    for name, fam in exposed().items():
        if fam["type"] == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = "histogram"
        else:
            out[name] = fam["type"]
    return out


def series_labels(name: str) -> set[str]:
    fams = exposed()
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and fams.get(base, {}).get("type") == "histogram":
            return set(fams[base]["labels"]) | ({"le"} if suffix == "_bucket" else set())
    return set(fams[name]["labels"]) if name in fams else set()


# -- dashboards -----------------------------------------------------------------------------------
def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # "panel 3 'Title' A" or "variable target"
    expr: str  # PromQL (for variables: the selector inside label_values)


LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$", re.S)


def queries(board: Mapping[str, Any]) -> Iterator[Query]:
    uid = board["uid"]
    for p in board.get("panels", []):
        for t in p.get("targets", []):
            yield Query(uid, f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
    for v in board.get("templating", {}).get("list", []):
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = LABEL_VALUES.match(q)
            assert m, f"{uid}: variable {v['name']}: expected label_values(<selector>, <label>), got {q!r}"
            yield Query(uid, f"variable {v['name']}", m.group(1))


def fill(expr: str, variables: Mapping[str, str]) -> str:
    """Grafana's substitution: built-ins, then $var / ${var} (longest names first)."""
    for k, v in BUILTINS.items():
        expr = expr.replace(k, v)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr.replace("$labels", "").replace("$value", ""), f"unfilled variable in {expr!r}"
    return expr


# -- expressions ----------------------------------------------------------------------------------
def _strip(expr: str) -> str:
    """The expression without string literals, label matchers, ranges and label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    return FUNCTION_ARGS.sub(" ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in an expression: identifiers that are neither functions, keywords nor labels."""
    text = _strip(expr)
    names = set()
    for m in IDENT.finditer(text):
        word = m.group(1)
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: matcher text}) for every vector selector that names a metric."""
    names = metric_names(expr)
    no_strings_outside = expr
    out = []
    for m in SELECTOR.finditer(no_strings_outside):
        name = m.group(1)
        if name not in names:
            continue
        matchers: dict[str, str] = {}
        if m.group(2):
            for lm in re.finditer(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2)):
                matchers[lm.group(1)] = lm.group(2) + lm.group(3)
        out.append((name, matchers))
    return out


def range_function_args(expr: str, funcs: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(function, metric, window) for func(metric{...}[window]) calls."""
    pat = re.compile(
        r"\b(" + "|".join(funcs) + r")\s*\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{[^}]*\})?\s*\[([^\]]*)\]"
    )
    return [(m.group(1), m.group(2), m.group(3)) for m in pat.finditer(expr)]


def function_calls(expr: str, funcs: tuple[str, ...]) -> int:
    return len(re.findall(r"\b(" + "|".join(funcs) + r")\s*\(", expr))


# -- promtool -------------------------------------------------------------------------------------
def promtool_parses(promtool: str, exprs: Mapping[str, str], tmp: Path) -> str:
    """Run `promtool check rules` on the expressions as recording rules; '' when all parse."""
    rules = [{"record": f"pgcache_check:q{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp / "queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, width=1000))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    # Map "rule N" in promtool's message back to the panel.
    names = list(exprs)
    msg = r.stdout + r.stderr
    for m in re.finditer(r"group \"dashboard-queries\", rule (\d+)", msg):
        i = int(m.group(1)) - 1
        if 0 <= i < len(names):
            msg += f"\n  rule {i + 1} = {names[i]}: {list(exprs.values())[i]}"
    return msg
