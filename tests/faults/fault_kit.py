"""Shared machinery of the fault-injection suite (tests/faults).

* :func:`trials` -- parametrizes a test with a few trials for the default run and many under the
  ``soak`` marker (``pytest -m soak tests/faults``; benchmarks/reliability.py runs that).
* :class:`FlowProcess` -- the ``wrangle`` flow with the ``rule:`` fakes of tests/flows in a child
  process that the test kills with SIGKILL, at a random moment or at a chosen :class:`Fault` point
  inside a chunk's write. Children are forked from a server process that imported the flow, Great
  Expectations and DuckDB once (multiprocessing's forkserver), so a trial costs a flow run, not
  five seconds of imports.
* :func:`ledger` -- what a run left in its results and quarantine tables: rows lost, duplicates,
  and rows that one table has without the other (a torn chunk write).

The figures reach docs/reliability.md through the ``fault_report`` fixture (tests/faults/conftest.py).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

_HERE = Path(__file__).resolve().parent
_PATHS = [str(_HERE.parents[1]), str(_HERE), str(_HERE.parent / "flows")]   # the checkout, this kit, flow_testkit
sys.path.insert(0, _PATHS[2])

import flow_testkit  # noqa: E402
import prefect.context  # noqa: E402

from flows import store  # noqa: E402
from flows.wrangle import wrangle  # noqa: E402
from wrangling_tasks import checks, tables  # noqa: E402

checks._context()   # Great Expectations imported and its context built here, once, not in every child

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload([__name__])


def _start_forkserver() -> None:
    """Start the fork server with this kit importable: it imports its preload modules before it
    applies the parent's sys.path, so they must be found through PYTHONPATH."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(_PATHS + ([old] if old else []))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def trials(fast: int, soak: int):
    """``@trials(fast=2, soak=40)``: the test takes ``trials``; the default run passes ``fast``, the
    ``soak`` variant (left out unless ``-m`` names soak) passes ``soak``."""
    return pytest.mark.parametrize("trials", [pytest.param(fast, id="fast"),
                                              pytest.param(soak, id="soak", marks=pytest.mark.soak)])


# --- faults inside a chunk's write -------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Where the child stops (``hold``) or which step it races (not ``hold``) in its ``chunk``-th write.

    ``point``: "in-transaction" (results inserted, quarantine not yet), "before-commit" (both inserted,
    COMMIT not yet sent) or "after-commit" (COMMIT returned; the connection still open). With ``hold``
    the child tells the parent and waits there to be killed; without, it tells the parent and goes
    on, so the kill lands in the COMMIT itself ("before-commit") or in the close and checkpoint that
    follow ("after-commit").
    """

    point: str
    chunk: int
    hold: bool = True

    POINTS = ("in-transaction", "before-commit", "after-commit")

    def __post_init__(self) -> None:
        if self.point not in self.POINTS or self.chunk < 1:
            raise ValueError(f"no such fault point: {self}")

    @property
    def name(self) -> str:
        return self.point if self.hold else f"racing {'the COMMIT' if self.point == 'before-commit' else 'the close'}"


def _install(fault: Fault, conn: Any) -> None:
    """Wrap the chunk write's steps in this (child) process so that it reaches ``fault``."""
    state = {"chunk": 0, "inside": False}
    write_chunk, transaction, replace_and_insert = store.write_chunk, tables.transaction, store.replace_and_insert

    def reached(point: str) -> None:
        if state["inside"] and state["chunk"] == fault.chunk and point == fault.point:
            conn.send(point)
            if fault.hold:
                time.sleep(300)   # the parent kills us here; if it never does, end without a trace
                os._exit(3)

    def chunk_write(*args: Any, **kwargs: Any) -> int:
        state["chunk"] += 1
        state["inside"] = True
        try:
            return write_chunk(*args, **kwargs)
        finally:
            state["inside"] = False

    @contextlib.contextmanager
    def txn(con: duckdb.DuckDBPyConnection):
        with transaction(con) as c:
            yield c
            reached("before-commit")
        reached("after-commit")

    def insert_results(*args: Any, **kwargs: Any) -> tuple[int, int]:
        counts = replace_and_insert(*args, **kwargs)   # write_chunk's results insert; its quarantine's comes next
        reached("in-transaction")
        return counts

    store.write_chunk, tables.transaction, store.replace_and_insert = chunk_write, txn, insert_results


def _child(params: dict, fault: Fault | None, api_url: str, log: str, conn: Any) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["PREFECT_API_URL"] = api_url
    prefect.context.refresh_global_settings_context()
    flow_testkit.register()
    if fault is not None:
        _install(fault, conn)
    conn.send("started")
    wrangle(**params)
    conn.send("done")


class FlowProcess:
    """``wrangle(**params)`` in a forked child (output in ``log``), with an optional ``fault``."""

    def __init__(self, params: dict, api_url: str, log: Path, fault: Fault | None = None) -> None:
        _start_forkserver()
        self._conn, send = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(target=_child, args=(params, fault, api_url, str(log), send), daemon=True)
        self.process.start()
        send.close()
        self.log = log

    def wait_for(self, message: str, timeout_s: float = 120) -> None:
        """Block until the child sends ``message``; fail with its log if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._conn.poll(0.05):
                try:
                    if self._conn.recv() == message:
                        return
                except EOFError:
                    break
            elif not self.process.is_alive() and not self._conn.poll():
                break
        self.kill()
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise AssertionError(f"the flow child never sent {message!r} (exit {self.process.exitcode}):\n{tail}")

    def kill(self) -> bool:
        """SIGKILL the child; True if it was still running."""
        alive = self.process.is_alive()
        if alive:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        self._conn.close()
        return alive and self.process.exitcode == -signal.SIGKILL

    def join(self, timeout_s: float = 120) -> int | None:
        self.process.join(timeout_s)
        self._conn.close()
        return self.process.exitcode


# --- what a run left behind --------------------------------------------------------------------


def ledger(db: Path, task: str, run_key: str, expected_rows: int) -> dict[str, int]:
    """Counts over ``run_key``'s rows: ``rows`` written, ``rows_lost`` (expected items without a
    row), ``duplicates`` (rows beyond one per item, in results or quarantine), ``torn`` (invalid
    rows without a quarantine row, or quarantine rows without an invalid row)."""
    results, quarantine = tables.quote_ident(store.RESULT_TABLES[task]), tables.quote_ident(store.QUARANTINE_TABLE)
    with tables.connect(db, read_only=True) as con:
        if not tables.table_exists(con, store.RESULT_TABLES[task]):
            return {"rows": 0, "rows_lost": expected_rows, "duplicates": 0, "torn": 0}
        rows, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT (row_key, occurrence)) FROM {results} WHERE run_key = ?",
            [run_key]).fetchall()[0]
        q_rows, q_distinct = con.execute(
            f"SELECT count(*), count(DISTINCT (row_key, occurrence)) FROM {quarantine} WHERE run_key = ?",
            [run_key]).fetchall()[0]
        torn = con.execute(
            f"SELECT count(*) FROM (SELECT row_key, occurrence FROM {results} WHERE run_key = ? AND NOT valid) r "
            f"FULL JOIN (SELECT DISTINCT row_key, occurrence FROM {quarantine} WHERE run_key = ?) q "
            "USING (row_key, occurrence) WHERE r.row_key IS NULL OR q.row_key IS NULL",
            [run_key, run_key]).fetchall()[0][0]
    return {"rows": rows, "rows_lost": expected_rows - distinct,
            "duplicates": (rows - distinct) + (q_rows - q_distinct), "torn": torn}


def run_statuses(db: Path, run_key: str) -> dict[str, str]:
    """``run_id -> status`` of every attempt of ``run_key``."""
    with tables.connect(db, read_only=True) as con:
        if not tables.table_exists(con, store.RUNS_TABLE):
            return {}
        return dict(con.execute(f"SELECT run_id, status FROM {tables.quote_ident(store.RUNS_TABLE)} "
                                "WHERE run_key = ?", [run_key]).fetchall())
