"""Candidate index keys from a statement's text, parsed by PostgreSQL's own parser (pglast).

Pure functions, no database: `statement_shape` reads which tables a statement touches and which
of their columns it filters by equality or range, joins on, and sorts by; `candidate_keys` turns
that into the few btree keys worth asking the planner about (dexter's approach: single columns,
then equality columns followed by one range or ORDER BY column).

pglast is imported here, and this module is imported only when the advisor runs, so a daemon
with the advisor disabled never loads the parser.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, NullTestType
from pglast.parser import ParseError

__all__ = [
    "ColumnUse",
    "StatementShape",
    "TableRef",
    "candidate_keys",
    "param_count",
    "predicate_columns",
    "resolve",
    "statement_shape",
]

EQUALITY_OPS = frozenset({"="})
RANGE_OPS = frozenset({"<", ">", "<=", ">="})
# Per table and statement: enough to find the good key, few enough to keep the planner calls cheap.
MAX_CANDIDATES_PER_TABLE = 12
MAX_KEY_COLUMNS = 3


@dataclass(frozen=True)
class TableRef:
    schema: str | None  # as written; None: resolved by the search_path
    name: str


@dataclass
class ColumnUse:
    """How one statement uses the columns of one table (each list in order of appearance)."""

    equality: list[str] = field(default_factory=list)
    range: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def add(self, kind: str, column: str) -> None:
        bucket: list[str] = getattr(self, kind)
        if column not in bucket:
            bucket.append(column)


@dataclass
class StatementShape:
    kind: str  # select | update | delete
    tables: list[TableRef]
    # Column uses by table; columns whose table the text does not say are under `unqualified`,
    # resolved later against the catalog (the column must exist in exactly one of the tables).
    uses: dict[TableRef, ColumnUse]
    unqualified: ColumnUse
    params: int


def _walk(node: Any) -> Iterator[ast.Node]:
    if isinstance(node, ast.Node):
        yield node
        slots: Any = getattr(node, "__slots__", ())
        for name in slots:
            yield from _walk(getattr(node, name, None))
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _walk(item)


def param_count(sql: str) -> int:
    """The highest $n in the statement (pg_stat_statements writes constants as $1, $2, ...)."""
    stmts = parse_sql(sql)
    return max((int(n.number or 0) for n in _walk(stmts) if isinstance(n, ast.ParamRef)), default=0)


def _strip(node: Any) -> Any:
    """`col::type` and `(col)` -> col."""
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return node


def _column(node: Any) -> tuple[str | None, str] | None:
    node = _strip(node)
    if not isinstance(node, ast.ColumnRef):
        return None
    fields = node.fields or ()
    names = [str(f.sval) for f in fields if isinstance(f, ast.String)]
    if len(names) != len(fields) or not names:
        return None  # `t.*`
    if len(names) == 1:
        return None, names[0]
    return names[-2], names[-1]


def _op(expr: ast.A_Expr) -> str:
    name = expr.name or ()
    return str(name[-1].sval) if name and isinstance(name[-1], ast.String) else ""


def statement_shape(sql: str) -> StatementShape | None:
    """The shape of a SELECT, UPDATE or DELETE; None for anything else or text that does not parse."""
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return None
    if len(stmts) != 1:
        return None
    stmt = stmts[0].stmt
    if isinstance(stmt, ast.SelectStmt):
        kind = "select"
    elif isinstance(stmt, ast.UpdateStmt):
        kind = "update"
    elif isinstance(stmt, ast.DeleteStmt):
        kind = "delete"
    else:
        return None
    nodes = list(_walk(stmt))
    ctes = {n.ctename for n in nodes if isinstance(n, ast.CommonTableExpr)}
    tables: list[TableRef] = []
    by_alias: dict[str, TableRef] = {}
    for n in nodes:
        if isinstance(n, ast.RangeVar) and n.relname not in ctes:
            ref = TableRef(n.schemaname, str(n.relname))
            if ref not in tables:
                tables.append(ref)
            by_alias[str(n.alias.aliasname) if n.alias is not None else ref.name] = ref
    uses: dict[TableRef, ColumnUse] = {t: ColumnUse() for t in tables}
    unqualified = ColumnUse()

    def note(kind: str, col: tuple[str | None, str]) -> None:
        qualifier, name = col
        if qualifier is None:
            unqualified.add(kind, name)
        elif qualifier in by_alias:
            uses[by_alias[qualifier]].add(kind, name)
        # else: a subquery's or CTE's column, not a table's

    for n in nodes:
        if isinstance(n, ast.A_Expr):
            op = _op(n)
            left, right = _column(n.lexpr), _column(n.rexpr) if not isinstance(n.rexpr, tuple) else None
            if n.kind == A_Expr_Kind.AEXPR_OP and op in EQUALITY_OPS:
                if left and right:
                    note("join", left)
                    note("join", right)
                elif left or right:
                    note("equality", left or right)  # type: ignore[arg-type]
            elif n.kind == A_Expr_Kind.AEXPR_OP and op in RANGE_OPS:
                if left and not right:
                    note("range", left)
                elif right and not left:
                    note("range", right)
            elif n.kind in (A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_OP_ANY) and op == "=" and left:
                note("equality", left)
            elif n.kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM) and left:
                note("range", left)
        elif isinstance(n, ast.SortBy):
            col = _column(n.node)
            if col:
                note("order", col)
    return StatementShape(kind, tables, uses, unqualified, param_count(sql))


def resolve(shape: StatementShape, columns: Mapping[TableRef, set[str]]) -> dict[TableRef, ColumnUse]:
    """Give each unqualified column to the one table (of `columns`: the resolved tables and
    their column names) that has it; a name in several tables or none is left out."""
    out = {t: ColumnUse(list(u.equality), list(u.range), list(u.join), list(u.order))
           for t, u in shape.uses.items() if t in columns}
    for kind in ("equality", "range", "join", "order"):
        for name in getattr(shape.unqualified, kind):
            owners = [t for t, cols in columns.items() if name in cols]
            if len(owners) == 1:
                out.setdefault(owners[0], ColumnUse()).add(kind, name)
    for t, use in out.items():
        for kind in ("equality", "range", "join", "order"):
            setattr(use, kind, [c for c in getattr(use, kind) if c in columns.get(t, set())])
    return out


def candidate_keys(use: ColumnUse) -> list[tuple[str, ...]]:
    """Btree keys to try for one table: each filtered, joined or first-sorted column alone; the
    equality columns together; equality columns followed by a range or the ORDER BY columns."""
    eq = list(dict.fromkeys(use.equality + use.join))
    keys: list[tuple[str, ...]] = []

    def add(key: Sequence[str]) -> None:
        key = tuple(dict.fromkeys(key))[:MAX_KEY_COLUMNS]
        if key and key not in keys:
            keys.append(key)

    for col in eq + use.range + use.order[:1]:
        add((col,))
    if len(eq) > 1:
        add(eq)
    for r in use.range:
        add((*eq[: MAX_KEY_COLUMNS - 1], r))
        for e in eq:
            add((e, r))
    if use.order:
        add((*eq[: MAX_KEY_COLUMNS - 1], use.order[0]))
        for e in eq:
            add((e, use.order[0]))
        add(use.order)
    return keys[:MAX_CANDIDATES_PER_TABLE]


def predicate_columns(predicate: str) -> list[str]:
    """The columns a partial index's predicate (pg_get_expr of pg_index.indpred) fixes to one
    value: `col = const`, `col`, `NOT col`, `col IS NULL`, joined by AND."""
    try:
        stmt = parse_sql(f"SELECT 1 WHERE {predicate}")[0].stmt
    except ParseError:
        return []
    assert isinstance(stmt, ast.SelectStmt)
    terms: list[Any] = [stmt.whereClause]
    out: list[str] = []
    while terms:
        term = terms.pop(0)
        if isinstance(term, ast.BoolExpr) and term.boolop == BoolExprType.AND_EXPR:
            terms.extend(term.args or ())
            continue
        if isinstance(term, ast.BoolExpr) and term.boolop == BoolExprType.NOT_EXPR:
            term = (term.args or (None,))[0]
        col: tuple[str | None, str] | None = None
        if isinstance(term, ast.A_Expr) and term.kind == A_Expr_Kind.AEXPR_OP and _op(term) == "=":
            col = _column(term.lexpr) or _column(term.rexpr)
        elif isinstance(term, ast.NullTest) and term.nulltesttype == NullTestType.IS_NULL:
            col = _column(term.arg)
        elif isinstance(term, ast.BooleanTest):
            col = _column(term.arg)
        else:
            col = _column(term)
        if col is not None and col[1] not in out:
            out.append(col[1])
    return out
