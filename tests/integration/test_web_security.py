"""TLS and basic auth from an exporter-toolkit web config, on every endpoint."""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from daemon_harness import all_off_except, fast_collectors, running_daemon, url

from exporter.config import ConfigError
from exporter.demo.servers import PostgresCluster

OFF = all_off_except("activity")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


HASH = bcrypt.hashpw(b"right-password", bcrypt.gensalt(rounds=4)).decode()


def web_config(certs: Path, body: str) -> Path:
    p = certs / f"web-{abs(hash(body))}.yml"
    p.write_text(body)
    return p


def daemon_config(pg: PostgresCluster, web_file: Path) -> dict:
    return {
        "web": {"listen_address": "127.0.0.1:0", "config_file": str(web_file)},
        "postgres": [{"name": "main", "dsn": pg.dsn}],
        "collectors": {**fast_collectors(), **OFF},
    }


def client_ssl(certs: Path, with_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if with_client_cert:
        ctx.load_cert_chain(certs / "client.crt", certs / "client.key")
    return ctx


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def get(address: str, ctx: ssl.SSLContext | None, auth: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.get(address, ssl=ctx if ctx else False, headers=auth) as r:
        await r.read()
        return r.status


async def test_tls_and_basic_auth_on_every_endpoint(pg: PostgresCluster, certs: Path) -> None:
    wc = web_config(certs, f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                           f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    async with running_daemon(daemon_config(pg, wc)) as d:
        https = url(d, "").replace("http://", "https://")
        ctx = client_ssl(certs)
        good = basic("prometheus", "right-password")
        for path in ("/metrics", "/", "/healthz"):
            assert await get(https + path, ctx, good) == 200
            assert await get(https + path, ctx, basic("prometheus", "wrong")) == 401
            assert await get(https + path, ctx, basic("mallory", "right-password")) == 401
            assert await get(https + path, ctx) == 401
        assert await get(https + "/ready", ctx) == 401
        # Plain HTTP against the TLS port never gets an answer.
        with pytest.raises(aiohttp.ClientError):
            await get(url(d, "/healthz"), None, good)


async def test_client_certificate_required(pg: PostgresCluster, certs: Path) -> None:
    wc = web_config(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                           "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    async with running_daemon(daemon_config(pg, wc)) as d:
        https = url(d, "/healthz").replace("http://", "https://")
        assert await get(https, client_ssl(certs, with_client_cert=True)) == 200
        with pytest.raises(aiohttp.ClientError):
            await get(https, client_ssl(certs, with_client_cert=False))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n", "cannot load nope.crt"),
        ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: Field required"),
        ("basic_auth_users:\n  bob: plaintext\n", "basic_auth_users.bob: not a bcrypt hash"),
        ("tls_config:\n  cert_file: x\n", "tls_config: unknown key"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
         "client_ca_file: required"),
    ],
)
async def test_invalid_web_config_is_refused_at_start(pg: PostgresCluster, certs: Path, body: str, message: str) -> None:
    wc = web_config(certs, body)
    with pytest.raises(ConfigError, match="web config .*" + message.replace(".", r"\.")):
        async with running_daemon(daemon_config(pg, wc)):
            pass


async def test_web_config_reload_valid_and_invalid(pg: PostgresCluster, certs: Path) -> None:
    wc = certs / "reloading.yml"
    wc.write_text(f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    async with running_daemon(daemon_config(pg, wc)) as d:
        ok = basic("prometheus", "right-password")
        assert await get(url(d, "/healthz"), None, ok) == 200
        new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4)).decode()
        wc.write_text(f"basic_auth_users:\n  prometheus: '{new_hash}'\n")
        assert await d.reload() is True
        assert await get(url(d, "/healthz"), None, ok) == 401
        assert await get(url(d, "/healthz"), None, basic("prometheus", "rotated")) == 200
        wc.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
        assert await d.reload() is False  # rejected: the rotated password still works
        assert await get(url(d, "/healthz"), None, basic("prometheus", "rotated")) == 200


async def test_stalled_tls_handshake_and_partial_request_are_closed_by_header_timeout(
    pg: PostgresCluster, certs: Path
) -> None:
    """A client that connects to the TLS port and never says hello, or finishes the handshake
    and never finishes its request, is closed after web.header_timeout; scrapes go on."""
    import asyncio
    import time

    wc = web_config(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    cfg = daemon_config(pg, wc)
    cfg["web"] = {**cfg["web"], "header_timeout": "1s"}
    async with running_daemon(cfg) as d:
        host, port = d.bound  # type: ignore[misc]
        silent_r, silent_w = await asyncio.open_connection(host, port)  # no ClientHello
        tls_r, tls_w = await asyncio.open_connection(host, port, ssl=client_ssl(certs),
                                                     server_hostname="127.0.0.1")
        tls_w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        https = url(d, "/healthz").replace("http://", "https://")
        assert await get(https, client_ssl(certs)) == 200
        assert await asyncio.wait_for(silent_r.read(), timeout=5) == b""
        assert await asyncio.wait_for(tls_r.read(), timeout=5) == b""
        assert time.monotonic() - started < 3
        for w in (silent_w, tls_w):
            w.close()


async def test_head_and_gzip_and_openmetrics_metrics(pg: PostgresCluster) -> None:
    """/metrics is written in chunks from shared bytes: every variant is whole and well-formed."""
    import gzip

    cfg = {"postgres": [{"name": "main", "dsn": pg.dsn}], "collectors": {**fast_collectors(), **OFF}}
    async with running_daemon(cfg) as d, aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(url(d), headers={"Accept-Encoding": "identity"}) as r:
            plain = await r.read()
            assert r.headers["Content-Length"] == str(len(plain))
        async with s.get(url(d), headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()).startswith(b"# HELP")
        async with s.get(url(d), headers={"Accept": "application/openmetrics-text"}) as r:
            assert (await r.read()).endswith(b"# EOF\n")
        async with s.head(url(d)) as r:
            assert r.status == 200 and await r.read() == b""
