"""A real Prometheus for end-to-end tests: started on a free loopback port with 1 s scrape and
evaluation intervals, scraping one target, removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from daemon_harness import wait_for

from exporter.demo.servers import free_port


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    async def get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.base + path, params=params) as r:
            body = await r.json()
            assert body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    async def alerts(self, name: str, state: str = "firing") -> list[dict[str, str]]:
        data = await self.get("/api/v1/alerts")
        return [a["labels"] for a in data["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]

    async def targets(self) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/targets")
        return list(data["activeTargets"])


@contextlib.contextmanager
def prometheus_server(tmp: Path, scrape_target: str, rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus not found: install Debian's `prometheus` package (.ci/run does)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(r) for r in rule_files],
        "scrape_configs": [{"job_name": "pgcache-exporter", "static_configs": [{"targets": [scrape_target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def prometheus_ready(p: Prometheus) -> None:
    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(p.base + "/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=20, what="Prometheus ready")
