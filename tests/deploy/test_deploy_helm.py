"""deploy/helm/pgcache-exporter, checked without a helm binary (none here): the chart's metadata,
its default config valid for the packaged program, and every `.Values` path the templates use
present in values.yaml. The templates themselves are not rendered by this suite."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from deploy_files import REPO, Installed

from exporter import __version__

CHART = REPO / "deploy" / "helm" / "pgcache-exporter"


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "pgcache-exporter"
    assert chart["appVersion"] == __version__, "appVersion is the image tag by default"


def test_default_config_passes_check_config(installed: Installed, tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values["config"]))
    (tmp_path / "secrets").mkdir()
    for key, value in values["secrets"].items():
        (tmp_path / "secrets" / key).write_text(value)
    r = installed.run("check-config", str(tmp_path / "config.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_templates_use_only_values_that_exist() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    used = set()
    for tpl in sorted((CHART / "templates").iterdir()):
        text = tpl.read_text()
        assert "{{" not in re.sub(r"\{\{.*?\}\}", "", text, flags=re.S), f"{tpl.name}: an unclosed {{{{ action"
        used |= set(re.findall(r"\.Values((?:\.\w+)+)", text))
    assert used
    for path in used:
        node = values
        for key in path.strip(".").split("."):
            assert isinstance(node, dict) and key in node, f".Values{path} is not in values.yaml"
            node = node[key]
