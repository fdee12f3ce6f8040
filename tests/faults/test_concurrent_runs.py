"""Fault trials: two processes start the same logical run at the same moment, as when a schedule
fires while a manual run is going. Each trial asserts that one attempt answers every row once and
the other fails at once naming the live attempt: no row lost, none duplicated, and the run records'
``written_rows`` add up to the table. Odd trials pit the plain flow against the scaled-out one (same
run key, one lock).

``TRIALS`` trials by default; ``pytest -m soak tests/faults/test_concurrent_runs.py`` runs
``SOAK_TRIALS`` more (skipped unless the soak marker is selected).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# A Prefect home of its own, set before anything imports Prefect (as tests/flows/conftest.py does).
_HOME = tempfile.mkdtemp(prefix="flexwrangle-prefect-faults-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", GX_ANALYTICS_ENABLED="False")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))

import duckdb  # noqa: E402
import pytest  # noqa: E402
from flow_testkit import EM_PARAMS, magellan_frames, make_db, outcome, start_at_once, stop  # noqa: E402

from flows.params import WrangleParams  # noqa: E402

TRIALS = 3
SOAK_TRIALS = 20
ROWS = 16


@pytest.fixture(scope="module")
def api():
    """A Prefect test server shared by this module's trials; its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def two_runs_of_one_key(workdir: Path, api_url: str, scale_out: bool) -> None:
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


@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_runs_of_one_key_at_once(trial, tmp_path, api):
    two_runs_of_one_key(tmp_path, api, scale_out=trial % 2 == 1)


@pytest.mark.soak
@pytest.mark.parametrize("trial", range(TRIALS, TRIALS + SOAK_TRIALS))
def test_two_runs_of_one_key_at_once_soak(trial, tmp_path, api, request):
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a soak trial: select it with -m soak")
    two_runs_of_one_key(tmp_path, api, scale_out=trial % 2 == 1)
