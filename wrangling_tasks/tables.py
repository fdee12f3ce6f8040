"""DuckDB I/O: short-lived connections, quoted identifiers, bound values, transactional writes.

DuckDB lets one process write a database file at a time; while it does, every other process
(even a read-only one) fails to open the file. So connections here are opened around a read
or a write and closed right after -- never held across slow work such as model inference.

Identifiers (table and column names) are always passed through :func:`quote_ident`; values
(limits, names in catalog lookups) are always bound parameters. Nothing user-supplied is
spliced into SQL text unquoted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

import duckdb
import pandas as pd

__all__ = [
    "TableError",
    "DatabaseNotFoundError",
    "DatabaseLockedError",
    "TableNotFoundError",
    "MissingColumnsError",
    "EmptyTableError",
    "quote_ident",
    "connect",
    "transaction",
    "table_exists",
    "table_columns",
    "require_table",
    "read_table",
    "count_rows",
    "replace_tables",
    "insert_frame",
]

_LOCK_MARKERS = ("could not set lock", "conflicting lock")
# How a caller's input database is opened (read-only): nothing outside the file, no extensions on demand.
UNTRUSTED_CONFIG = {"enable_external_access": False, "autoload_known_extensions": False,
                    "autoinstall_known_extensions": False}
LOCK_TIMEOUT_S = 30.0  # how long a connection waits, by default, for another process to release the file


class TableError(ValueError):
    """A problem with the database or a table the caller named (raised before any write)."""


class DatabaseNotFoundError(TableError, FileNotFoundError):
    """The database file does not exist (and the caller did not ask to create it)."""


class DatabaseLockedError(duckdb.IOException):
    """Another process kept the database file locked for longer than the caller would wait.

    A ``duckdb.IOException``, as DuckDB's own lock error is, so code that caught that still does.
    """


class TableNotFoundError(TableError):
    """The named table or view does not exist."""


class MissingColumnsError(TableError):
    """The table lacks columns the caller needs."""


class EmptyTableError(TableError):
    """The table has no rows."""


def quote_ident(name: str) -> str:
    """Quote one SQL identifier for DuckDB: ``a"b`` -> ``"a""b"``.

    Any text is a valid quoted identifier except the empty string and NUL.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise TableError(f"invalid identifier: {name!r}; a table or column name must be non-empty "
                         "text without NUL characters")
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def connect(
    database: str | os.PathLike,
    *,
    read_only: bool = False,
    create: bool = False,
    lock_timeout_s: float | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``database`` for the duration of a ``with`` block, then close it.

    A missing file raises :class:`DatabaseNotFoundError` unless ``create`` (a typo in a path
    must not silently create an empty database). While another process holds the file's
    lock, retry for up to ``lock_timeout_s`` seconds (default :data:`LOCK_TIMEOUT_S`), then
    raise :class:`DatabaseLockedError` naming the file, the holder and what to do.

    A ``read_only`` connection reads a caller's input database, which may not be the caller's
    own: it runs without external access and without loading or installing extensions on its own,
    so a view in it cannot read local files or URLs, nor pull in code.
    """
    path = os.fspath(database)
    if path != ":memory:" and not os.path.exists(path):
        if not create:
            raise DatabaseNotFoundError(f"database file not found: {path!r}")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DatabaseNotFoundError(f"directory for database does not exist: {parent!r}")
    wait_s = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            con = duckdb.connect(path, read_only=read_only, config=UNTRUSTED_CONFIG if read_only else {})
            break
        except duckdb.IOException as exc:
            if not any(m in str(exc).lower() for m in _LOCK_MARKERS):
                raise
            if time.monotonic() >= deadline:
                raise _locked(path, wait_s, exc) from exc
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        yield con
    finally:
        con.close()


def _locked(path: str, waited_s: float, exc: duckdb.IOException) -> DatabaseLockedError:
    holder = re.search(r"\(PID (\d+)\)", str(exc))
    who = f"process {holder.group(1)}" if holder else "another process"
    return DatabaseLockedError(
        f"database {os.path.abspath(path)!r} is locked by {who} (waited {waited_s:g} s; DuckDB allows one "
        "writing process or any number of reading ones). Close that process's connection to it (a DuckDB "
        "shell or notebook left open, another run writing this file) or wait for it to finish, then try "
        "again: a wrangle run started again with the same parameters resumes where it stopped.")


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """True if a table or view called exactly ``name`` exists in the current schema."""
    rows = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = ? AND table_schema = current_schema()",
        [name],
    ).fetchall()  # fetchall, not fetchone: DuckDB 2 keeps a half-read result open
    return bool(rows[0][0])


def table_columns(con: duckdb.DuckDBPyConnection, name: str) -> list[str]:
    """Column names of table ``name`` in declaration order (empty if there is no such table)."""
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = ? AND table_schema = current_schema() ORDER BY ordinal_position",
        [name],
    ).fetchall()
    return [r[0] for r in rows]


def require_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    columns: Sequence[str] = (),
    *,
    non_empty: bool = True,
) -> list[str]:
    """Check that ``name`` exists, has ``columns`` and (optionally) rows; return its columns."""
    quote_ident(name)  # rejects empty / NUL names with a clear message
    if not table_exists(con, name):
        raise TableNotFoundError(f"table not found: {name!r}")
    have = table_columns(con, name)
    missing = [c for c in columns if c not in have]
    if missing:
        raise MissingColumnsError(
            f"table {name!r} lacks column(s) {missing}; it has {have}"
        )
    if non_empty and count_rows(con, name) == 0:
        raise EmptyTableError(f"table {name!r} is empty")
    return have


def count_rows(con: duckdb.DuckDBPyConnection, name: str) -> int:
    """Number of rows in ``name``."""
    return int(con.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchall()[0][0])


def read_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    columns: Sequence[str] | None = None,
    *,
    limit: int | None = None,
) -> pd.DataFrame:
    """Read ``columns`` (default all) of ``name`` into a DataFrame, in the table's stored order.

    DuckDB keeps insertion order for plain scans (``preserve_insertion_order``, on by
    default), so the same unchanged table reads back in the same order every time.
    """
    cols = "*" if columns is None else ", ".join(quote_ident(c) for c in columns)
    sql = f"SELECT {cols} FROM {quote_ident(name)}"
    params: list[object] = []
    if limit is not None:
        if int(limit) < 0:
            raise TableError(f"limit must be >= 0, got {limit}")
        sql += " LIMIT ?"
        params.append(int(limit))
    try:
        return con.execute(sql, params).df()
    except duckdb.PermissionException as exc:   # a view over files or URLs, read without external access
        raise TableError(f"{name!r} reads files or URLs outside the database ({exc}); input tables are read "
                         "without external access: store the data in a table of the database instead") from exc


def replace_tables(con: duckdb.DuckDBPyConnection, frames: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Create or replace each table ``name`` with ``frames[name]``, all in one transaction.

    Returns the number of rows written per table.
    """
    view = _scratch_name()
    with transaction(con):
        for name, frame in frames.items():
            con.register(view, frame)
            try:
                con.execute(
                    f"CREATE OR REPLACE TABLE {quote_ident(name)} AS SELECT * FROM {quote_ident(view)}"
                )
            finally:
                con.unregister(view)
    return {name: len(frame) for name, frame in frames.items()}


def _scratch_name() -> str:
    """A name for a registered frame that no table of the caller's can have (a registered frame
    hides a table of the same name)."""
    return f"__flexwrangle_{uuid.uuid4().hex}"


def insert_frame(
    con: duckdb.DuckDBPyConnection,
    name: str,
    frame: pd.DataFrame,
    *,
    ignore_conflicts: bool = False,
) -> None:
    """Insert ``frame``'s columns (by name) into existing table ``name``.

    Runs inside whatever transaction the caller opened. With ``ignore_conflicts``, rows whose
    primary key is already present are skipped (``ON CONFLICT DO NOTHING``), which makes a
    retried write idempotent.
    """
    if frame.empty:
        return
    view = _scratch_name()
    cols = ", ".join(quote_ident(c) for c in frame.columns)
    sql = f"INSERT INTO {quote_ident(name)} ({cols}) SELECT {cols} FROM {quote_ident(view)}"
    if ignore_conflicts:
        sql += " ON CONFLICT DO NOTHING"
    con.register(view, frame)
    try:
        con.execute(sql)
    finally:
        con.unregister(view)
