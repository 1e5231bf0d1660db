"""TLS and basic auth from a web config file in the Prometheus exporter-toolkit format, so
operators reuse the file they already have for node_exporter or postgres_exporter:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional (default NoClientCert)
      client_ca_file: ca.crt                         # needed to verify client certificates
      min_version: TLS12                             # optional
    basic_auth_users:
      alice: $2y$10$...                              # bcrypt hashes (htpasswd -B)

The file is validated at start and on every reload; relative paths are relative to the file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, cast

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

__all__ = ["WebConfig", "WebSecurity", "load_web_config"]

ClientAuth = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Model):
    cert_file: Path
    key_file: Path
    client_auth_type: ClientAuth = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: TLSVersion = "TLS12"
    max_version: TLSVersion = "TLS13"
    # Accepted for compatibility with exporter-toolkit files; Python's defaults are used.
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True


class HTTPServerConfig(_Model):
    http2: bool = True
    headers: dict[str, str] = {}


class WebConfig(_Model):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = HTTPServerConfig()
    basic_auth_users: dict[str, str] = {}


def load_web_config(path: Path) -> tuple[WebConfig, ssl.SSLContext | None]:
    """Parse, validate and build the TLS context; every error names the file and the key."""
    where = f"web config {path}"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    try:
        cfg = WebConfig.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors(include_url=False, include_input=False):
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{where}: {key}: {msg}")
        raise ConfigError("\n".join(msgs)) from None
    for user, hashed in cfg.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(
                f"{where}: basic_auth_users.{user}: not a bcrypt hash (create one with htpasswd -nBC 10 \"\" )"
            )
    tls = cfg.tls_server_config
    if tls is None:
        return cfg, None
    base = path.resolve().parent

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = _TLS_VERSIONS[tls.max_version]
    try:
        ctx.load_cert_chain(resolve(tls.cert_file), resolve(tls.key_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"{where}: tls_server_config.cert_file/key_file: cannot load {tls.cert_file} "
            f"with {tls.key_file}: {e}"
        ) from None
    if tls.client_auth_type != "NoClientCert":
        verify = tls.client_auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven")
        if verify and tls.client_ca_file is None:
            raise ConfigError(
                f"{where}: tls_server_config.client_ca_file: required for client_auth_type "
                f"{tls.client_auth_type}"
            )
        if tls.client_ca_file is not None:
            try:
                ctx.load_verify_locations(resolve(tls.client_ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"{where}: tls_server_config.client_ca_file: cannot load {tls.client_ca_file}: {e}"
                ) from None
        # Python can verify a client certificate or not ask for one; "request without verifying"
        # has no equivalent, so the two Require* modes both verify against client_ca_file.
        required = tls.client_auth_type in ("RequireAnyClientCert", "RequireAndVerifyClientCert")
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return cfg, ctx


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes; a success is remembered (keyed by a
    SHA-256 of user and password) so a scrape every few seconds does not pay bcrypt each time."""

    def __init__(self) -> None:
        self.users: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self._ok: set[bytes] = set()

    def configure(self, cfg: WebConfig | None) -> None:
        self.users = dict(cfg.basic_auth_users) if cfg else {}
        self.headers = dict(cfg.http_server_config.headers) if cfg else {}
        self._ok = set()

    async def allowed(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        token = hashlib.sha256(f"{user}\0{password}\0{hashed}".encode()).digest()
        if any(hmac.compare_digest(token, t) for t in self._ok):
            return True
        try:
            # bcrypt is slow on purpose: keep it off the event loop.
            ok = await asyncio.to_thread(
                bcrypt.checkpw, password.encode(), hashed.replace("$2y$", "$2b$", 1).encode()
            )
        except ValueError:
            return False
        if ok:
            if len(self._ok) > 1000:
                self._ok.clear()
            self._ok.add(token)
        return ok


def auth_middleware(auth: BasicAuth) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not await auth.allowed(request.headers.get("Authorization")):
            return web.Response(
                status=401,
                text="Unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="pgcache-exporter"', **auth.headers},
            )
        response = await handler(request)
        response.headers.update(auth.headers)
        return response

    return cast(Middleware, middleware)


class WebSecurity:
    """The live TLS context and basic-auth users of the HTTP server, reloadable on SIGHUP."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.auth = BasicAuth()
        self.ssl_context: ssl.SSLContext | None = None
        self.middleware = auth_middleware(self.auth)

    def load(self) -> None:
        """At start: validate the file and build the TLS context the server will use."""
        if self.path is None:
            return
        cfg, self.ssl_context = load_web_config(self.path)
        self.auth.configure(cfg)

    def reload(self, path: Path | None) -> None:
        """On reload: validate again (ConfigError keeps everything as it was), then apply the
        users and headers, and re-read the certificate files into the live TLS context."""
        if path != self.path:
            raise ConfigError("web.config_file: changing the file (or adding TLS) needs a restart")
        if path is None:
            return
        cfg, fresh = load_web_config(path)
        if (fresh is None) != (self.ssl_context is None):
            raise ConfigError(f"web config {path}: turning TLS on or off needs a restart")
        self.auth.configure(cfg)
        if fresh is not None and self.ssl_context is not None and cfg.tls_server_config:
            base = path.resolve().parent
            tls = cfg.tls_server_config
            self.ssl_context.load_cert_chain(
                tls.cert_file if tls.cert_file.is_absolute() else base / tls.cert_file,
                tls.key_file if tls.key_file.is_absolute() else base / tls.key_file,
            )
