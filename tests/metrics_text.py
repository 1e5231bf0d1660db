"""Reading an exposition in tests: parse it the way Prometheus' Python client does."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


def samples(text: str | bytes, name: str, **labels: str) -> list[float]:
    """Values of every sample called `name` whose labels include `labels`."""
    if isinstance(text, bytes):
        text = text.decode()
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s.value)
    return out


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    """The single matching sample's value, None when absent; fails if several match."""
    found = samples(text, name, **labels)
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def types(text: str | bytes) -> dict[str, str]:
    if isinstance(text, bytes):
        text = text.decode()
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def promtool_check_metrics(promtool: str, exposition: bytes) -> None:
    """Fail with promtool's own words when the exposition is not valid."""
    r = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
    # promtool exits 1 on lint problems as well as on parse errors; both are failures for us.
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
