"""A run killed with SIGKILL midway resumes, when started again, without duplicates."""

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
from flow_testkit import EM_PARAMS, magellan_frames, make_db

from flows.wrangle import wrangle

DRIVER = Path(__file__).with_name("resume_driver.py")


def committed(db: Path) -> int:
    """Rows committed so far (0 while the results table does not exist or the file is busy)."""
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables "
                               "WHERE table_name = 'wrangle_entity_matching'").fetchall()[0][0]:
                return 0
            return con.execute("SELECT count(*) FROM wrangle_entity_matching").fetchall()[0][0]
    except duckdb.IOException:  # the flow holds the write lock for a moment
        return -1


def test_sigkill_midway_then_restart_completes_without_duplicates(tmp_path, prefect_api):
    db = make_db(tmp_path / "resume.duckdb", magellan_frames(n_pairs=40))
    params = {**EM_PARAMS, "database": str(db), "model": "rule:same",
              "chunk_size": 4, "batch_size": 4}
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "FLEXWRANGLE_FAKE_DELAY": "0.4"}
    child = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(params)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while committed(db) < 8:
            assert child.poll() is None, "the flow ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk committed within 120 s"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    done = committed(db)
    assert 8 <= done < 40  # killed midway

    result = wrangle(**params)  # same parameters, in this process, without the delay

    assert result["skipped_rows"] == done
    assert result["written_rows"] == 40 - done
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT row_key, occurrence, run_id FROM wrangle_entity_matching").df()
        runs = con.execute("SELECT run_id, status FROM wrangle_runs ORDER BY started_at").df()
    assert len(rows) == 40
    assert not rows.duplicated(["row_key", "occurrence"]).any()
    assert runs["status"].tolist() == ["interrupted", "completed"]
    assert set(rows["run_id"]) == set(runs["run_id"])  # both attempts wrote rows
    assert result["metrics"]["f1"] == pytest.approx(1.0)
