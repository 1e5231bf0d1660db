"""Kubernetes manifests: offline schema validation, the Prometheus Operator resources checked
structurally, the generated files equal to a fresh generation, the pods' config valid for the
packaged program, and the StatefulSet's shard wiring splitting the targets exactly once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_files import (
    K8S,
    REPO,
    Installed,
    dockerfile_stages,
    k8s_find,
    k8s_manifests,
    materialize_projected_volume,
)

from exporter.config import load_config

# The oldest Kubernetes still commonly run, and the newest the validator knows.
VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOADS = [("Deployment", "pgcache-exporter"), ("StatefulSet", "pgcache-exporter-sharded")]


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, docs in k8s_manifests().items() for doc in docs]


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_resources_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    checked = set()
    for path, doc in _docs():
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']}/{doc['metadata']['name']} on {version}: {e.message}")
        checked.add(doc["kind"])
    assert checked >= {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"}


def test_the_validator_rejects_a_misspelt_field() -> None:
    # Strict mode is what catches typos; make sure it is on.
    bad = json.loads(json.dumps(k8s_find("Deployment", "pgcache-exporter")))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomizations_list_existing_manifests_and_leave_out_the_secret_examples() -> None:
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        resources = yaml.safe_load(kfile.read_text())["resources"]
        for res in resources:
            assert (kfile.parent / res).is_file(), f"{kfile.relative_to(REPO)}: {res} does not exist"
            assert "example" not in res, "applying an example Secret would overwrite the real one"
        listed = {kfile.parent / r for r in resources}
        for path in kfile.parent.glob("*.yaml"):
            if path.name != "kustomization.yaml" and "example" not in path.name:
                assert path in listed, f"{path.relative_to(REPO)} is not in {kfile.relative_to(REPO)}"


def test_generated_files_equal_a_fresh_generation() -> None:
    gen = _load_generator()
    assert gen.ALERTS.is_file() and sorted(gen.DASHBOARDS.glob("*.json")), "the generator's sources are missing"
    rendered = gen.render()
    assert set(rendered) == {K8S / "prometheusrule.yaml", K8S / "dashboards.yaml"}
    for path, text in rendered.items():
        assert path.read_text() == text, (
            f"{path.relative_to(REPO)} is out of date: run python deploy/kubernetes/generate.py")


def test_prometheus_rule_groups_are_the_alert_rules() -> None:
    rule = k8s_find("PrometheusRule", "pgcache-exporter")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]


def test_dashboard_configmaps_carry_each_dashboard_for_the_sidecar() -> None:
    maps = [d for _, d in _docs() if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    files = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
    assert len(maps) == len(files)
    for cm, path in zip(sorted(maps, key=lambda d: next(iter(d["data"]))), files, strict=True):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"] == {path.name: path.read_text()}
        assert len(yaml.safe_dump(cm).encode()) < 1 << 20, "a ConfigMap holds at most 1 MiB"


def test_service_monitor_scrapes_every_exporter_service_as_job_pgcache_exporter() -> None:
    sm = k8s_find("ServiceMonitor", "pgcache-exporter")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    services = [d for _, d in _docs() if d["kind"] == "Service"]
    selected = [s for s in services
                if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {"pgcache-exporter", "pgcache-exporter-sharded"}
    for svc in selected:
        # The alerts select job="pgcache-exporter": the job comes from this label of the Service.
        assert svc["metadata"]["labels"][spec["jobLabel"]] == "pgcache-exporter"
        ports = {p["name"] for p in svc["spec"]["ports"]}
        assert all(ep["port"] in ports for ep in spec["endpoints"])
    assert [ep["path"] for ep in spec["endpoints"]] == ["/metrics"]


def _container(kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    workload = k8s_find(kind, name)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return workload, container


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_workloads_are_hardened_and_probed(kind: str, name: str) -> None:
    workload, c = _container(kind, name)
    pod = workload["spec"]["template"]["spec"]
    (user,) = dockerfile_stages()[-1].all("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0], "the image's uid"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", 19187)]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    # Services route to the pods they are meant for.
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _pod_config(kind: str, name: str, root: Path) -> Path:
    """The container's --config.file, with its volume laid out under root."""
    workload, c = _container(kind, name)
    (arg,) = [a for a in c["args"] if a.startswith("--config.file=")]
    config = Path(arg.split("=", 1)[1])
    (mount,) = [m for m in c["volumeMounts"] if config.is_relative_to(m["mountPath"])]
    assert mount["readOnly"] is True
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    local = materialize_projected_volume(volume, root / mount["mountPath"].lstrip("/"))
    return local / config.relative_to(mount["mountPath"])


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_pod_config_passes_check_config_of_the_packaged_program(
    kind: str, name: str, installed: Installed, tmp_path: Path
) -> None:
    workload, c = _container(kind, name)
    from exporter.cli import build_parser
    build_parser().parse_args(c["args"])
    config = _pod_config(kind, name, tmp_path)
    r = installed.run("check-config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr


def test_statefulset_ordinals_split_six_targets_across_three_replicas(tmp_path: Path) -> None:
    sts, c = _container("StatefulSet", "pgcache-exporter-sharded")
    replicas = sts["spec"]["replicas"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PGCACHE_SHARD_INDEX"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["PGCACHE_SHARD_TOTAL"]["value"] == str(replicas), "shard total must equal spec.replicas"
    config = _pod_config("StatefulSet", "pgcache-exporter-sharded", tmp_path)
    everything = {t.name for t in load_config(config, env={}).postgres}
    assert len(everything) == 6 and replicas == 3
    owned: list[set[str]] = []
    for ordinal in range(replicas):
        # What the container sees: its pod name (from the downward API) and the total.
        pod_env = {"PGCACHE_SHARD_INDEX": f"{sts['metadata']['name']}-{ordinal}",
                   "PGCACHE_SHARD_TOTAL": env["PGCACHE_SHARD_TOTAL"]["value"]}
        cfg = load_config(config, env=pod_env)
        assert (cfg.shard.index, cfg.shard.total) == (ordinal, replicas)
        owned.append({t.name for t in cfg.postgres if cfg.shard.owns(t.name)})
    assert all(owned), f"a replica with nothing to do: {owned}"
    assert sum(len(o) for o in owned) == len(everything) and set().union(*owned) == everything
