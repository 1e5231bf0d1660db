"""What kind of statement `explain` was given, read without running it: one statement or
several, whether it writes, which `$n` parameters it uses; and `--params` turned into literals.
Seed-style `:name` parameters (SQLAlchemy's `text()`) are rewritten to `$1, $2, ...` in order of
first use, and take their values from a JSON object (`--params '{"user_id": 5}'`).

This is a guard, not a parser: the read-only transaction `explain --analyze` runs in is what
stops a write that no reading of the text can see (a SELECT calling a function that writes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Statement", "StatementError", "parse_params", "read_statement"]

_WORD = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_PARAM = re.compile(r"\$(\d+)")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")

READING_STARTS = {"SELECT", "WITH", "VALUES", "TABLE", "("}
WRITING_WORDS = {"INSERT", "UPDATE", "DELETE", "MERGE"}
LOCK_STRENGTH = {"UPDATE", "SHARE", "NO", "KEY"}


class StatementError(ValueError):
    """The statement or its parameters cannot be explained as given; str(e) says why."""


@dataclass(frozen=True)
class Statement:
    text: str  # without a trailing semicolon
    first_word: str
    writes: str | None  # why it would write, in words; None: reads only (as far as text shows)
    parameters: int  # highest $n used
    names: tuple[str, ...] = ()  # `:name` parameters, in $n order (the text uses $n for them)


def _tokens(sql: str) -> tuple[list[str], list[int]]:
    """Upper-cased words, `$n` parameters and punctuation, outside comments, string literals
    and quoted identifiers (a quoted identifier becomes the token '"'); and where each starts."""
    out: list[str] = []
    starts: list[int] = []
    i, n, last = 0, len(sql), 0
    while i < n:
        ch = sql[i]
        if len(starts) < len(out):
            starts.append(last)
        last = i
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while depth and i < n:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise StatementError("unterminated /* comment")
        elif ch == "'":
            escapes = bool(out) and out[-1] == "E" and i > 0 and sql[i - 1] in "eE"
            if escapes:
                out.pop()
            i += 1
            while True:
                if i >= n:
                    raise StatementError("unterminated string literal")
                if escapes and sql[i] == "\\":
                    i += 2
                elif sql[i] == "'":
                    if sql.startswith("''", i):
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
            out.append("'")
        elif ch == '"':
            j = i + 1
            while True:
                j = sql.find('"', j)
                if j < 0:
                    raise StatementError('unterminated quoted identifier (")')
                if sql.startswith('""', j):
                    j += 2
                    continue
                break
            out.append('"')
            i = j + 1
        elif ch == "$":
            if m := _PARAM.match(sql, i):
                out.append(m.group(0))
                i = m.end()
            elif m := _DOLLAR_TAG.match(sql, i):
                end = sql.find(m.group(0), m.end())
                if end < 0:
                    raise StatementError(f"unterminated dollar-quoted string ({m.group(0)})")
                out.append("'")
                i = end + len(m.group(0))
            else:
                out.append("$")
                i += 1
        elif m := _WORD.match(sql, i):
            out.append(m.group(0).upper())
            i = m.end()
        else:
            out.append(ch)
            i += 1
    if len(starts) < len(out):
        starts.append(last)
    return out, starts


def _writes(first: str, words: list[str]) -> str | None:
    if first not in READING_STARTS:
        return f"it is {first}, not a query"
    for k, w in enumerate(words):
        if w == "FOR" and k + 1 < len(words) and words[k + 1] in LOCK_STRENGTH:
            return "it locks rows (FOR UPDATE/SHARE)"
        if w in WRITING_WORDS:
            return f"it contains {w} (a data-modifying WITH query)"
        if w == "INTO":
            return "it is a SELECT INTO (which creates a table)"
    return None


def read_statement(sql: str) -> Statement:
    """Check that `sql` is one statement and classify it; StatementError says what is wrong."""
    tokens, starts = _tokens(sql)
    end = len(sql)
    while tokens and tokens[-1] == ";":
        tokens.pop()
        end = starts.pop()
    if not tokens:
        raise StatementError("the statement is empty")
    if ";" in tokens:
        raise StatementError("several statements (separated by ;): give exactly one")
    first = tokens[0]
    if first in ("EXPLAIN", "ANALYZE"):
        raise StatementError(f"give the statement itself, without {first} (the command adds EXPLAIN)")
    params = [int(t[1:]) for t in tokens if _PARAM.fullmatch(t)]
    body, names = _named_params(sql[:end], tokens, starts)
    if names and params:
        raise StatementError("the statement mixes $n and :name parameters: use one kind")
    if names:
        return Statement(body.strip(), first, _writes(first, tokens), len(names), names)
    return Statement(sql[:end].strip(), first, _writes(first, tokens), max(params, default=0))


def _named_params(sql: str, tokens: list[str], starts: list[int]) -> tuple[str, tuple[str, ...]]:
    """`:name` (not `::type`, not inside a literal or comment) -> `$k`, k by first use."""
    names: list[str] = []
    pieces: list[str] = []
    last = 0
    for k, tok in enumerate(tokens):
        at = starts[k]
        if tok != ":" or k + 1 >= len(tokens) or starts[k + 1] != at + 1:
            continue
        if k > 0 and tokens[k - 1] == ":" and starts[k - 1] == at - 1:
            continue  # the second colon of ::
        if tokens[k + 1] == ":":
            continue  # the first colon of ::
        m = _WORD.match(sql, at + 1)
        if m is None or m.start() != at + 1:
            continue
        name = m.group(0)
        if name not in names:
            names.append(name)
        pieces += [sql[last:at], f"${names.index(name) + 1}"]
        last = m.end()
    if not names:
        return sql, ()
    return "".join(pieces) + sql[last:], tuple(names)


def _literal(value: Any) -> str:
    """A SQL literal of unknown type (the server converts it to the parameter's type); E'' with
    every backslash and quote escaped is safe whatever standard_conforming_strings says."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        s = "true" if value else "false"
    elif isinstance(value, int | float):
        s = repr(value)
    elif isinstance(value, str):
        s = value
    else:
        s = json.dumps(value, ensure_ascii=False)
    if "\x00" in s:
        raise StatementError("a parameter contains a NUL character, which PostgreSQL cannot store")
    return "E'" + s.replace("\\", "\\\\").replace("'", "''") + "'"


def parse_params(raw: str | None, statement: Statement) -> list[str] | None:
    """`--params '[1, "a"]'` -> SQL literals for $1, $2...; None when there are none."""
    if raw is None:
        if statement.parameters:
            raise StatementError(
                f"the statement uses ${statement.parameters}: give --params with "
                f"{statement.parameters} value(s), a JSON array for $1..${statement.parameters}"
            )
        return None
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StatementError(f"--params is not valid JSON: {e}") from None
    if statement.names:
        if not isinstance(values, dict):
            raise StatementError(
                "the statement uses :name parameters: give --params as a JSON object, e.g. "
                + json.dumps({n: "..." for n in statement.names})
            )
        missing = [n for n in statement.names if n not in values]
        unknown = sorted(set(values) - set(statement.names))
        if missing or unknown:
            raise StatementError(
                "--params does not match the statement's :name parameters"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; not in the statement: {', '.join(unknown)}" if unknown else "")
            )
        return [_literal(values[n]) for n in statement.names]
    if isinstance(values, dict):
        raise StatementError("--params is a JSON object but the statement has no :name parameter "
                             "(give a JSON array for $1, $2, ...)")
    if not isinstance(values, list):
        raise StatementError("--params must be a JSON array: its values are bound to $1, $2, ... in order")
    if len(values) != statement.parameters:
        raise StatementError(
            f"--params has {len(values)} value(s) but the statement uses "
            f"{'$1..$' + str(statement.parameters) if statement.parameters else 'no $n parameter'}"
        )
    return [_literal(v) for v in values] if values else None
