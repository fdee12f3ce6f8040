"""Fault trials: two processes start the same logical run at the same moment, as when a schedule
fires while a manual run is going. Each trial asserts that one attempt answers every row once and
the other fails at once naming the live attempt: no row lost, none duplicated, and the run records'
``written_rows`` add up to the table. Odd trials pit the plain flow against the scaled-out one (same
run key, one lock).

A few trials by default, many under ``pytest -m soak tests/faults/test_concurrent_runs.py``
(``fault_kit.trials``); the figures go to docs/reliability.md through ``fault_report``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import duckdb
from fault_kit import trials
from flow_testkit import EM_PARAMS, magellan_frames, make_db, outcome, start_at_once, stop

from flows.params import WrangleParams

ROWS = 16


def two_runs_of_one_key(workdir: Path, api_url: str, scale_out: bool) -> tuple[int, int]:
    """One trial; returns (rows lost, duplicate rows), both checked to be 0."""
    db = make_db(workdir / "em.duckdb", magellan_frames(n_pairs=ROWS))
    params = {**EM_PARAMS, "database": str(db), "model": "rule:same", "chunk_size": 4, "batch_size": 4}
    run_key = WrangleParams(**params).run_key()
    runs = [params, {**params, "scale_out": True, "partitions": 2, "deployment": None,
                     "output_dir": str(workdir / "parts")} if scale_out else params]
    hold = workdir / "go-on"     # no answer before the test says so: the winner is still live when the loser starts
    env = {**os.environ, "PREFECT_API_URL": api_url, "FLEXWRANGLE_FAKE_HOLD": str(hold)}
    procs = start_at_once(runs, env, workdir)
    try:
        deadline = time.monotonic() + 180
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run ended: the second attempt was not refused"
            time.sleep(0.05)
        hold.touch()
        ends = [outcome(p) for p in procs]
    finally:
        stop(procs)

    won = [i for i, e in enumerate(ends) if e.returncode == 0]
    assert len(won) == 1, [e.stderr[-2000:] for e in ends]
    winner, loser = ends[won[0]], ends[1 - won[0]]
    assert f"run {run_key} is already running: attempt {winner.result['run_id']}" in loser.stderr
    assert f"pid {procs[won[0]].pid} " in loser.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT row_key, occurrence FROM wrangle_entity_matching").df()
        runs = con.execute("SELECT status, written_rows FROM wrangle_runs").df()
    lost = ROWS - len(rows.drop_duplicates())
    duplicates = len(rows) - len(rows.drop_duplicates())
    assert (lost, duplicates) == (0, 0)
    assert runs["written_rows"].sum() == ROWS and runs["status"].tolist() == ["completed"]
    return lost, duplicates


@trials(fast=2, soak=20)
def test_two_runs_of_one_key_at_once(trials, tmp_path, prefect_api, fault_report):
    pairs, lost, dups = Counter(), 0, 0
    for trial in range(trials):
        scale_out = trial % 2 == 1
        workdir = tmp_path / f"trial{trial}"
        workdir.mkdir()
        trial_lost, trial_dups = two_runs_of_one_key(workdir, prefect_api, scale_out=scale_out)
        lost, dups = lost + trial_lost, dups + trial_dups
        pairs["plain vs scaled-out" if scale_out else "plain vs plain"] += 1
    fault_report("two concurrent same-key runs", trials=trials, faults=trials, rows_lost=lost, duplicates=dups,
                 outcome="clear error", note=f"{ROWS} rows; one attempt answers every row once, the other fails "
                 "at once naming the live attempt and its pid; pairs", counts=pairs)
