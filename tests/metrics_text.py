"""Reading an exposition in tests: parse it the way Prometheus' Python client does."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


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
