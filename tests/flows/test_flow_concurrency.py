"""One live attempt per logical run: the run lock on its own, and two real processes starting the
same run while the first is answering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from flow_testkit import EM_PARAMS, magellan_frames, make_db, outcome, start_flow, stop

from flows import runlock
from flows.params import WrangleParams


def test_a_held_run_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    db = tmp_path / "x.duckdb"
    first = runlock.holder_info("attempt-1", "wrangle-entity-matching-pairs", "2030-01-01 00:00:00")
    with runlock.hold(db, "rk", first) as path:
        assert json.loads(path.read_text())["run_id"] == "attempt-1"
        with pytest.raises(runlock.RunAlreadyRunning, match=rf"run rk is already running: attempt attempt-1 "
                                                            rf"\(wrangle-entity-matching-pairs\), pid {os.getpid()}"):
            with runlock.hold(db, "rk", runlock.holder_info("attempt-2", None, "now")):
                pass
        with runlock.hold(db, "other-key", runlock.holder_info("attempt-3", None, "now")):
            pass                                                   # another run is another lock
    assert not path.exists()                                       # released and removed
    with runlock.hold(db, "rk", runlock.holder_info("attempt-4", None, "now")):
        pass


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    db = tmp_path / "x.duckdb"
    code = ("import sys, time; from flows import runlock\n"
            "with runlock.hold(sys.argv[1], 'rk', runlock.holder_info('dead', None, 'then')):\n"
            "    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunAlreadyRunning, match="attempt dead"):
            with runlock.hold(db, "rk", runlock.holder_info("alive", None, "now")):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runlock.hold(db, "rk", runlock.holder_info("alive", None, "now")):   # no lease to wait out
        pass


def _holder(db, run_key: str, deadline: float) -> dict:
    """The live attempt's lock-file record, once it has written it."""
    path = runlock.lock_path(db, run_key)
    while True:
        try:
            info = json.loads(path.read_text() or "{}")
            if info.get("run_id"):
                return info
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.05)


def test_a_second_process_starting_a_live_run_fails_at_once_and_the_first_finishes_alone(tmp_path, prefect_api):
    n = 24
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=n))
    params = {**EM_PARAMS, "database": str(db), "model": "rule:same", "chunk_size": 4, "batch_size": 4}
    run_key = WrangleParams(**params).run_key()
    hold = tmp_path / "go-on"            # the fake model answers nothing until the test creates it
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "FLEXWRANGLE_FAKE_HOLD": str(hold)}
    first = start_flow(params, env, tmp_path / "logs")
    try:
        live = _holder(db, run_key, time.monotonic() + 180)
        second = outcome(start_flow(params, env, tmp_path / "logs"), timeout=180)
        assert first.poll() is None
        hold.touch()
        done = outcome(first)
    finally:
        stop([first])

    assert second.returncode != 0 and second.result is None
    assert f"run {run_key} is already running: attempt {live['run_id']}" in second.stderr
    assert f"pid {first.pid}" in second.stderr and live["pid"] == first.pid
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.result["written_rows"] == n and done.result["skipped_rows"] == 0
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT row_key, occurrence, run_id FROM wrangle_entity_matching").df()
        runs = con.execute("SELECT run_id, status, written_rows, host, pid FROM wrangle_runs").df()
    assert len(rows) == n and not rows.duplicated(["row_key", "occurrence"]).any()
    assert runs.to_dict("records") == [{"run_id": live["run_id"], "status": "completed", "written_rows": n,
                                        "host": live["host"], "pid": first.pid}]
    assert set(rows["run_id"]) == {live["run_id"]}
    assert not runlock.lock_path(db, run_key).exists()
