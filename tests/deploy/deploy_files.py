"""Readers for the deploy material, shared by the deploy tests: the Dockerfile's instructions and
stages, .dockerignore matching, YAML documents, and a pod's projected config volume laid out on disk."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "docker-compose.yml"
K8S = REPO / "deploy" / "kubernetes"
SYSTEMD = REPO / "deploy" / "systemd"

# -- the built package ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    """The console script of the wheel installed into a clean venv."""

    venv: Path
    exe: Path

    def run(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # A minimal environment: nothing from this venv or the repo leaks into the installed program.
        base = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                "LANG": "C.UTF-8"}
        return subprocess.run([str(self.exe), *args], env={**base, **(env or {})}, cwd=cwd or self.venv,
                              capture_output=True, text=True, timeout=timeout)


# -- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)   # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages, with line continuations joined and ARG defaults substituted into FROM."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        ins, rest = ins.upper(), rest.strip()
        if ins == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif ins == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        else:
            assert stages, f"Dockerfile: {ins} before the first FROM"
            stages[-1].instructions.append((ins, rest))
    return stages


def copy_sources(args: str) -> tuple[list[str], str, dict[str, str]]:
    """COPY [--flag=v ...] SRC... DEST -> (sources, dest, flags)."""
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return words[:-1], words[-1], flags


# -- .dockerignore -------------------------------------------------------------------------------


def _ignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        out.append((negate, line.lstrip("!").strip("/")))
    return out


def _pattern_matches(pattern: str, rel: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern):
            return True
        if pattern.startswith("**/") and any(
            fnmatch.fnmatchcase("/".join(parts[j:i]), pattern[3:]) for j in range(i)
        ):
            return True
    return False


def in_build_context(rel: str) -> bool:
    """Whether .dockerignore lets this repo-relative path into the build context (last match wins)."""
    included = True
    for negate, pattern in _ignore_patterns():
        if _pattern_matches(pattern, rel):
            included = negate
    return included


def context_files(source: str) -> list[str]:
    """The files a COPY source brings in: every file under it that .dockerignore keeps."""
    root = REPO / source
    assert root.exists(), f"Dockerfile COPY {source}: no such file in the repository"
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [rel for p in paths if in_build_context(rel := p.relative_to(REPO).as_posix())]


def builder_context_files() -> list[str]:
    """Every file the first (builder) stage copies from the build context."""
    files: list[str] = []
    for args in dockerfile_stages()[0].all("COPY"):
        sources, _, flags = copy_sources(args)
        assert "from" not in flags
        for src in sources:
            files += context_files(src)
    return files


# -- YAML ----------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


def k8s_manifests() -> dict[Path, list[dict[str, Any]]]:
    """Every Kubernetes manifest under deploy/kubernetes (Kustomizations excluded)."""
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        docs = yaml_docs(path)
        if docs and docs[0].get("kind") != "Kustomization":
            out[path] = docs
    return out


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [d for docs in k8s_manifests().values() for d in docs
             if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under deploy/kubernetes, found {len(found)}"
    return found[0]


def materialize_projected_volume(volume: dict[str, Any], root: Path) -> Path:
    """Lay out a projected volume as kubelet would, from the ConfigMap and the example Secret in
    deploy/kubernetes (the example's stringData stands in for the real secret)."""
    root.mkdir(parents=True, exist_ok=True)
    for source in volume["projected"]["sources"]:
        if "configMap" in source:
            data = k8s_find("ConfigMap", source["configMap"]["name"])["data"]
            ref = source["configMap"]
        else:
            data = k8s_find("Secret", source["secret"]["name"])["stringData"]
            ref = source["secret"]
        for item in ref["items"]:
            assert item["key"] in data, f"{ref['name']} has no key {item['key']}"
            dest = root / item["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(data[item["key"]])
    return root
