"""Logging for the program (a library never configures logging): text or JSON lines, and a
filter that scrubs every configured secret from every record, whatever logged it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable

import orjson

__all__ = ["Redactor", "redactor", "setup_logging"]


class Redactor:
    """Replaces known secrets (DSNs, passwords) by '***' in any text."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first, so a whole DSN is replaced before the password inside it.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self.set_secrets([*self._secrets, *secrets])

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text


redactor = Redactor()


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        if record.stack_info:
            msg += "\n" + record.stack_info
            record.stack_info = None
        record.msg = redactor(msg)
        record.args = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # APScheduler reports each run at INFO; our own logs say what matters.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
