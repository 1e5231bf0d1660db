"""What can be known about a PostgreSQL DSN or a Redis URL without connecting, and the target name
a bare one gets.

Each check returns every problem it finds, one line each, and never echoes the value: a password
holding an unencoded @ : / ? or # splits the URL in the wrong place, so part of it can land where
the host, port or database should be. What is checked is what asyncpg and redis-py would refuse
(or silently misread) only when they connect.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from urllib.parse import ParseResult, parse_qs, parse_qsl, unquote, urlparse, urlsplit

__all__ = ["dsn_problems", "redis_url_problems", "target_name"]


def _quoted(value: str) -> str:
    shown = value if len(value) <= 60 else value[:57] + "..."
    return '"' + shown.replace('"', '\\"') + '"'


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# Options asyncpg understands itself; any other option is sent to the server as a setting.
_PG_OPTIONS = {
    "host", "port", "dbname", "database", "user", "password", "passfile", "sslmode", "sslcert",
    "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "target_session_attrs", "krbsrvname", "gsslib", "service",
}
# libpq options asyncpg does not know: it would send them as server settings, and the server
# refuses the connection ("unrecognized configuration parameter").
_LIBPQ_ONLY = {
    "connect_timeout": "set postgres[].connect_timeout instead",
    "keepalives": "", "keepalives_idle": "", "keepalives_interval": "", "keepalives_count": "",
    "tcp_user_timeout": "", "channel_binding": "", "gssencmode": "", "requirepeer": "",
    "sslcompression": "", "sslsni": "", "hostaddr": "", "load_balance_hosts": "",
    "require_auth": "", "replication": "", "fallback_application_name": "",
}
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})?")
_GUC_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ENCODE_HINT = "if the user name or password holds @ : / ? or #, percent-encode it (@ is %40)"


def _port_problem(port: str, what: str = "port") -> str | None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{what} is not a number from 1 to 65535; {_ENCODE_HINT}"
    return None


def _host_problems(host: str, *, allow_empty: bool) -> list[str]:
    if not host:
        return [] if allow_empty else ["a host is empty"]
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return ["a host in [brackets] is not an IPv6 address"]
        if rest and not rest.startswith(":") or not sep:
            return ["a bracketed IPv6 host is followed by something other than :port"]
        return []
    if unquote(host).startswith("/"):
        return []  # a Unix-socket directory
    if "@" in host:
        return [f"the host part holds an @: {_ENCODE_HINT}"]
    if not _HOSTNAME_RE.fullmatch(host):
        return [f"a host is not a valid host name or address; {_ENCODE_HINT}"]
    return []


def _hostspec_problems(hostspec: str) -> list[str]:
    """host[:port][,host[:port]...] from the URL's authority."""
    problems: list[str] = []
    specs = hostspec.split(",")
    for spec in specs:
        if spec.startswith("["):
            close = spec.find("]")
            host, port = (spec[:close + 1], spec[close + 2:]) if close >= 0 else (spec, "")
            has_port = close >= 0 and spec[close + 1:close + 2] == ":"
        else:
            host, has_port_sep, port = spec.partition(":")
            has_port = bool(has_port_sep)
        problems += _host_problems(host, allow_empty=len(specs) == 1)
        if has_port:
            p = _port_problem(port)
            if p:
                problems.append(p)
    return problems


def _parsed(url: str, kind: str, expected: str) -> ParseResult | str:
    """The URL parsed, or why it cannot be (never echoing any part of it)."""
    if not isinstance(url, str) or "://" not in url:
        return f"not a {kind} URL (expected {expected})"
    try:
        return urlparse(url)
    except ValueError:  # urllib checks [IPv6] hosts itself
        if "[" in url:
            return f"a host in [brackets] is not an IPv6 address; {_ENCODE_HINT}"
        return f"not a {kind} URL; {_ENCODE_HINT}"


def dsn_problems(dsn: str) -> list[str]:
    u = _parsed(dsn, "PostgreSQL", "postgresql://user:password@host:port/dbname")
    if isinstance(u, str):
        return [u]
    if u.scheme not in ("postgres", "postgresql"):
        return ["not a PostgreSQL URL: the scheme must be postgresql:// or postgres:// "
                "(expected postgresql://user:password@host:port/dbname)"]
    problems: list[str] = []
    hostspec = u.netloc.rpartition("@")[2] if "@" in u.netloc else u.netloc
    if u.netloc.count("@") > 1:
        problems.append(f"more than one @ before the host: {_ENCODE_HINT}")
    else:
        problems += _hostspec_problems(hostspec)
    if "@" in u.path or "@" in u.query or "@" in u.fragment:
        problems.append(f"an @ after the host: {_ENCODE_HINT}")
    if u.fragment:
        problems.append(f"the URL has a # part, which would be ignored; {_ENCODE_HINT}")
    database = unquote(u.path[1:]) if u.path.startswith("/") else u.path
    if "/" in database:
        problems.append("the database name holds a / (write postgresql://host:port/dbname)")
    elif len(database.encode()) > 63:
        problems.append("the database name is longer than 63 bytes")
    if u.query:
        try:
            options = parse_qsl(u.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            return [*problems, "the options after ? are not key=value pairs joined by &"]
        problems += _pg_option_problems(options)
    return problems


def _pg_option_problems(options: list[tuple[str, str]]) -> list[str]:
    problems: list[str] = []
    for key, value in options:
        where = f"option {key}"
        if key == "port":
            for p in value.split(","):
                problem = _port_problem(p, f"{where}: a port")
                if problem:
                    problems.append(problem)
        elif key == "host":
            for h in value.split(","):
                problems += [f"{where}: {p}" for p in _host_problems(h, allow_empty=False)]
        elif key == "sslmode" and value not in _SSLMODES:
            problems.append(f"{where}: must be one of {', '.join(_SSLMODES)}")
        elif key == "target_session_attrs" and value not in _SESSION_ATTRS:
            problems.append(f"{where}: must be one of {', '.join(_SESSION_ATTRS)}")
        elif key in ("ssl_min_protocol_version", "ssl_max_protocol_version") and value not in _TLS_VERSIONS:
            problems.append(f"{where}: must be one of {', '.join(_TLS_VERSIONS)}")
        elif key == "sslnegotiation" and value not in ("postgres", "direct"):
            problems.append(f"{where}: must be postgres or direct")
        elif key in ("sslcert", "sslkey", "sslrootcert", "sslcrl", "passfile") and value:
            if not os.path.isfile(os.path.expanduser(value)):
                problems.append(f"{where}: no readable file at {_quoted(value)}")
        elif key in _LIBPQ_ONLY:
            hint = _LIBPQ_ONLY[key] or "remove it"
            problems.append(f"{where}: a libpq option the exporter's driver (asyncpg) does not support: {hint}")
        elif key == "client_encoding" and value.lower().replace("-", "") != "utf8":
            problems.append(f"{where}: the exporter's driver (asyncpg) needs UTF8")
        elif key not in _PG_OPTIONS and not _GUC_RE.fullmatch(key):
            problems.append(f"{where}: not a libpq option or a server setting name")
    return problems


# Query options redis-py turns into connection arguments (any other option fails at connect time).
_REDIS_OPTIONS = {
    "db": "int", "socket_timeout": "float", "socket_connect_timeout": "float", "timeout": "float",
    "socket_read_size": "int", "max_connections": "int", "health_check_interval": "int",
    "protocol": "int", "ssl_min_version": "int", "socket_keepalive": "bool",
    "retry_on_timeout": "bool", "ssl_check_hostname": "bool", "client_name": "str",
    "ssl_cert_reqs": "str", "ssl_ca_certs": "file", "ssl_certfile": "file", "ssl_keyfile": "file",
    "ssl_ca_path": "str", "ssl_password": "str", "username": "str", "password": "str",
}
_BOOLS = {"0", "1", "true", "false", "yes", "no", "t", "f", "y", "n", "on", "off", ""}


def redis_url_problems(url: str) -> list[str]:
    u = _parsed(url, "Redis", "redis://[:password@]host:port/db")
    if isinstance(u, str):
        return [u]
    if u.scheme not in ("redis", "rediss", "unix"):
        return ["not a Redis URL: the scheme must be redis://, rediss:// or unix:// "
                "(expected redis://[:password@]host:port/db)"]
    problems: list[str] = []
    if u.netloc.count("@") > 1:
        problems.append(f"more than one @ before the host: {_ENCODE_HINT}")
    elif u.scheme == "unix":
        if not u.path:
            problems.append("a unix:// URL needs the socket path (unix:///run/redis.sock?db=0)")
    else:
        hostspec = u.netloc.rpartition("@")[2]
        if "," in hostspec:
            problems.append("a Redis URL names one host (list cluster nodes as separate targets "
                            "or give one node with cluster: true)")
        else:
            if hostspec.startswith("["):
                close = hostspec.find("]")
                host, port = hostspec[:close + 1], hostspec[close + 2:] if close >= 0 else ""
                has_port = close >= 0 and hostspec[close + 1:close + 2] == ":"
            else:
                host, sep, port = hostspec.partition(":")
                has_port = bool(sep)
            problems += _host_problems(host, allow_empty=True)
            if has_port:
                p = _port_problem(port)
                if p:
                    problems.append(p)
        db = unquote(u.path).strip("/")
        if db and not db.isdigit():
            problems.append("the database after the host must be a number (redis://host:6379/0); "
                            f"{_ENCODE_HINT}")
    if "@" in u.path or "@" in u.query or "@" in u.fragment:
        problems.append(f"an @ after the host: {_ENCODE_HINT}")
    if u.fragment:
        problems.append(f"the URL has a # part, which would be ignored; {_ENCODE_HINT}")
    if u.query:
        try:
            options = parse_qsl(u.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            return [*problems, "the options after ? are not key=value pairs joined by &"]
        for key, value in options:
            kind = _REDIS_OPTIONS.get(key)
            where = f"option {key}"
            if kind is None:
                problems.append(f"{where}: not an option redis-py accepts in a URL")
            elif kind == "int" and not value.isdigit():
                problems.append(f"{where}: must be a whole number")
            elif kind == "float" and not re.fullmatch(r"\d+(\.\d*)?|\.\d+", value):
                problems.append(f"{where}: must be a number of seconds")
            elif kind == "bool" and value.lower() not in _BOOLS:
                problems.append(f"{where}: must be true or false")
            elif kind == "file" and not os.path.isfile(os.path.expanduser(value)):
                problems.append(f"{where}: no readable file at {_quoted(value)}")
    return problems


def target_name(value: str, key: str, index: int) -> str:
    """The name of a target given as a bare URL (`key` is "dsn" or "url"): host, port and
    database, never the user or password; only characters a target name may hold."""
    try:
        u = urlsplit(value)
        query = parse_qs(u.query)
    except ValueError:
        return f"target{index}"
    hostspec = u.netloc.rpartition("@")[2]
    db = ""
    if u.scheme == "unix":
        label = unquote(u.path) or "unix"
        db = (query.get("db") or [""])[-1]
    else:
        label = unquote(hostspec) or (query.get("host") or ["localhost"])[-1]
        if key == "url":
            db = (query.get("db") or [unquote(u.path).strip("/")])[-1]
        else:
            db = unquote(u.path).lstrip("/") or (query.get("dbname") or query.get("database") or [""])[-1]
    if key == "url" and db in ("0", "00"):
        db = ""  # Redis's default database: the name stays host:port
    label = f"{label}/{db}" if db else label
    # Only the characters a target name may hold (NAME_RE); the database keeps its place.
    label = re.sub(r"[^A-Za-z0-9_.:/@-]", "_", label.replace(",", "_"))
    if len(label) > 64:
        label = label[:55] + "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return label or f"target{index}"
