"""A flow run killed with SIGKILL -- at a random moment, or at a chosen point of a chunk's write (results
inserted, quarantine not yet; both inserted, before COMMIT; after COMMIT; or racing the COMMIT or the
close and checkpoint) -- leaves whole chunks only, and the run started again with the same parameters
ends with every row once.

Each trial forks a child that runs the flow on a fresh database (16 pairs, 4 chunks; three pairs get
unparseable answers, so chunks 1 and 3 write results and quarantine rows in one transaction), kills
it, checks what the kill left, then runs the flow again in this process and checks the whole run.
The killed attempt's record is checked loosely (never "completed" unless it had written every row):
how an attempt found dead is marked is the run record's business.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from conftest import EM_CHUNK, EM_N
from fault_kit import Fault, FlowProcess, ledger, run_statuses, trials

from flows.params import WrangleParams
from flows.wrangle import wrangle
from wrangling_tasks import tables

TASK = "entity-matching"
CHUNKS = EM_N // EM_CHUNK


def wrong_answers(db, run_key: str) -> int:
    """Valid rows whose answer is not the gold label (the fake answers every parseable pair right)."""
    with tables.connect(db, read_only=True) as con:
        return con.execute("SELECT count(*) FROM wrangle_entity_matching WHERE run_key = ? AND valid "
                           "AND answer IS DISTINCT FROM label", [run_key]).fetchall()[0][0]


def killed_state(db, params: dict) -> tuple[str, dict[str, int]]:
    """The run key and what the killed attempt left committed; a chunk is never half there."""
    run_key = WrangleParams(**params).run_key()
    left = ledger(db, TASK, run_key, EM_N)
    assert left["torn"] == 0, f"a chunk's results and quarantine rows were committed apart: {left}"
    assert left["duplicates"] == 0 and left["rows"] % EM_CHUNK == 0, left
    return run_key, left


def run_again(db, params: dict, committed: int) -> dict[str, int]:
    """Start the run again in this process; check it took up exactly where the kill left it."""
    result = wrangle(**params)
    assert result["skipped_rows"] == committed and result["written_rows"] == EM_N - committed
    whole = ledger(db, TASK, result["run_key"], EM_N)
    assert whole["torn"] == 0 and wrong_answers(db, result["run_key"]) == 0, whole
    assert result["quarantined_rows"] == 3
    statuses = run_statuses(db, result["run_key"])
    assert statuses.pop(result["run_id"]) == "completed"
    assert all(s != "completed" for s in statuses.values()) or committed == EM_N, statuses
    return whole


@trials(fast=2, soak=40)
def test_sigkill_at_a_random_moment_then_run_again(trials, em_fault_db, prefect_api, tmp_path,
                                                   fault_rng, fault_report):
    db, params = em_fault_db("unkilled")      # one run to the end measures how long a run takes
    child = FlowProcess(params, prefect_api, tmp_path / "unkilled.log")
    child.wait_for("started")
    began = time.monotonic()
    child.wait_for("done")
    span = time.monotonic() - began
    assert child.join() == 0
    assert ledger(db, TASK, WrangleParams(**params).run_key(), EM_N)["rows"] == EM_N

    landed, faults, lost, dups = Counter(), 0, 0, 0
    for i in range(trials):
        db, params = em_fault_db(f"trial{i}")
        child = FlowProcess(params, prefect_api, tmp_path / f"trial{i}.log")
        child.wait_for("started")
        time.sleep(fault_rng.uniform(0, span))
        faults += child.kill()
        _, left = killed_state(db, params)
        landed["before the first commit" if left["rows"] == 0 else
               "after the last" if left["rows"] == EM_N else "between commits"] += 1
        whole = run_again(db, params, left["rows"])
        lost, dups = lost + whole["rows_lost"], dups + whole["duplicates"]

    fault_report("SIGKILL at a random moment of a flow run, then run again", trials=trials, faults=faults,
                 rows_lost=lost, duplicates=dups, outcome="recovered",
                 note=f"{CHUNKS} chunk commits a run; kills landed", counts=landed)


CASES = [("in-transaction", True), ("before-commit", True), ("after-commit", True),
         ("before-commit", False), ("after-commit", False)]


@pytest.mark.parametrize("point, hold", CASES, ids=[Fault(p, 1, h).name.replace(" ", "-") for p, h in CASES])
@trials(fast=1, soak=10)
def test_sigkill_inside_a_chunk_write_then_run_again(point, hold, trials, em_fault_db, prefect_api, tmp_path,
                                                     fault_rng, fault_report):
    committed_chunks, faults, lost, dups = Counter(), 0, 0, 0
    for i in range(trials):
        fault = Fault(point, chunk=fault_rng.randint(1, CHUNKS), hold=hold)
        db, params = em_fault_db(f"trial{i}")
        child = FlowProcess(params, prefect_api, tmp_path / f"trial{i}.log", fault)
        child.wait_for(point)
        if not hold:
            time.sleep(fault_rng.uniform(0, 0.002))   # spread the kills over the step it races
        faults += child.kill()
        _, left = killed_state(db, params)
        before, after = (fault.chunk - 1) * EM_CHUNK, fault.chunk * EM_CHUNK
        if point == "after-commit":
            assert left["rows"] == after, f"{fault}: a committed chunk was lost: {left}"
        elif hold:
            assert left["rows"] == before, f"{fault}: an uncommitted chunk was kept: {left}"
        else:
            assert left["rows"] in (before, after), f"{fault}: {left}"
        committed_chunks["kept" if left["rows"] == after else "rolled back"] += 1
        whole = run_again(db, params, left["rows"])
        lost, dups = lost + whole["rows_lost"], dups + whole["duplicates"]

    fault_report(f"SIGKILL inside a chunk's write: {Fault(point, 1, hold).name}, then run again", trials=trials,
                 faults=faults, rows_lost=lost, duplicates=dups, outcome="recovered",
                 note="" if hold else "the killed chunk was", counts=None if hold else committed_chunks)
