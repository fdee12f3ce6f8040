"""Another process holding the DuckDB file while a flow writes it: DuckDB lets no writer in while any
other process has the file open (read-only or not). The flow's connections wait for the lock
(``tables.LOCK_TIMEOUT_S``, and the write task's retries): a holder that lets go in time costs only
time; one that does not fails the run with an error that names the file, the holder and what to do,
and the run started again once it is gone ends with every row once.
"""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest
from conftest import EM_CHUNK, EM_N
from fault_kit import ledger, run_statuses, trials

from flows import steps
from flows.params import WrangleParams
from flows.wrangle import wrangle
from wrangling_tasks import tables

TASK = "entity-matching"
MODES = ("read-only", "read-write")
LOAD = steps.load

HOLD = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == 'read-only'); "
        "print('held', flush=True); time.sleep(float(sys.argv[3]))")


class Holder:
    """A process that opens ``db`` (``mode``) and keeps it open ``seconds``, or until stopped."""

    def __init__(self, db, mode: str, seconds: float = 600) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(db), mode, str(seconds)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held", "the holder could not open the database"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def hold_after(monkeypatch, chunk: int, start) -> list[Holder]:
    """Call ``start()`` (which opens a holder) once the flow has written ``chunk`` chunks."""
    holders, done = [], [0]

    def load_then_hold(*args, **kwargs):
        inserted = LOAD(*args, **kwargs)
        done[0] += 1
        if done[0] == chunk:
            holders.append(start())
        return inserted
    monkeypatch.setattr(steps, "load", load_then_hold)
    return holders


@trials(fast=1, soak=8)
def test_a_holder_that_lets_go_in_time_only_delays_the_run(trials, em_fault_db, prefect_api, fault_rng,
                                                           monkeypatch, fault_report):
    lost = dups = 0
    for i in range(trials):
        db, params = em_fault_db(f"trial{i}")
        mode, chunk = MODES[i % 2], fault_rng.randint(1, EM_N // EM_CHUNK - 1)
        holders = hold_after(monkeypatch, chunk, lambda: Holder(db, mode, seconds=1.5))

        result = wrangle(**params)

        assert len(holders) == 1
        holders[0].process.wait()
        assert result["written_rows"] == EM_N and result["quarantined_rows"] == 3
        whole = ledger(db, TASK, result["run_key"], EM_N)
        assert whole["torn"] == 0
        lost, dups = lost + whole["rows_lost"], dups + whole["duplicates"]
    fault_report("another process holds the DuckDB file for 1.5 s mid-run (read-only or read-write)",
                 trials=trials, faults=trials, rows_lost=lost, duplicates=dups, outcome="recovered",
                 note="the next write waits for the lock")


@trials(fast=1, soak=6)
def test_a_holder_that_keeps_the_file_fails_the_run_clearly_and_a_rerun_completes(
        trials, em_fault_db, prefect_api, fault_rng, monkeypatch, fault_report):
    monkeypatch.setattr(tables, "LOCK_TIMEOUT_S", 0.5)   # the write task still retries twice
    lost = dups = 0
    for i in range(trials):
        db, params = em_fault_db(f"trial{i}")
        mode, chunk = MODES[(i + 1) % 2], fault_rng.randint(1, EM_N // EM_CHUNK - 1)
        holders = hold_after(monkeypatch, chunk, lambda: Holder(db, mode))
        try:
            with pytest.raises(tables.DatabaseLockedError) as failure:
                wrangle(**params)
            message = str(failure.value)
            assert str(db) in message and f"process {holders[0].process.pid}" in message
            assert "Close that process's connection" in message and "resumes" in message
        finally:
            for h in holders:
                h.stop()
        run_key = WrangleParams(**params).run_key()
        assert ledger(db, TASK, run_key, EM_N)["rows"] == chunk * EM_CHUNK   # what was written stays

        monkeypatch.setattr(steps, "load", LOAD)
        result = wrangle(**params)

        assert result["skipped_rows"] == chunk * EM_CHUNK
        whole = ledger(db, TASK, run_key, EM_N)
        assert whole["torn"] == 0
        statuses = run_statuses(db, run_key)
        assert statuses.pop(result["run_id"]) == "completed"
        assert "completed" not in statuses.values()
        lost, dups = lost + whole["rows_lost"], dups + whole["duplicates"]
    fault_report("another process keeps the DuckDB file open mid-run (read-only or read-write), then the "
                 "run is started again", trials=trials, faults=trials, rows_lost=lost, duplicates=dups,
                 outcome="clear error", note="DatabaseLockedError names the file, the holder's PID and what "
                                             "to do; the rerun resumes")


def test_the_lock_error_names_the_file_the_holder_and_what_to_do(tmp_path):
    db = tmp_path / "held.duckdb"
    duckdb.connect(str(db)).close()
    holder = Holder(db, "read-write")
    try:
        with pytest.raises(duckdb.IOException) as failure:   # still what DuckDB's own error was
            with tables.connect(db, read_only=True, lock_timeout_s=0):
                pass
    finally:
        holder.stop()
    assert isinstance(failure.value, tables.DatabaseLockedError)
    assert str(db) in str(failure.value) and f"process {holder.process.pid}" in str(failure.value)
    with tables.connect(db, read_only=True, lock_timeout_s=0):
        pass
