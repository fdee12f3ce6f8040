"""The product path for real: scripts/serve.sh starts a Prefect server and a worker and deploys
prefect.yaml; `prefect deployment run wrangle/entity-matching` runs through the worker and
writes to DuckDB; scripts/stop_serve.sh stops everything. About a minute and a half."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from flows.load_benchmarks import benchmark_tables
from wrangling_tasks import tables

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PYTHON_BIN_DIR", Path(sys.executable).parent))

pytestmark = [pytest.mark.server, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_leftovers(state: Path) -> None:
    """Safety net if stop_serve.sh failed: SIGKILL the process groups it should have ended."""
    for name in ("worker", "server"):
        pidfile = state / f"{name}.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


def test_deployment_runs_through_a_real_worker(tmp_path):
    db = tmp_path / "wrangle.duckdb"
    with tables.connect(db, create=True) as con:
        tables.replace_tables(con, benchmark_tables("Beer"))
    home = tmp_path / "prefect-home"
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_PORT": str(port),
           "PYTHON_BIN_DIR": str(BIN),
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no nightly runs in a test
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    try:
        serve = subprocess.run(["bash", str(ROOT / "scripts/serve.sh")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        assert serve.returncode == 0, serve.stdout[-3000:] + serve.stderr[-3000:]
        params = {"database": str(db), "model": "constant:No", "limit": 20, "chunk_size": 8}
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "wrangle/entity-matching",
             "--params", json.dumps(params), "--watch", "--watch-timeout", "240"],
            cwd=tmp_path, env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True,
            timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
    finally:
        stop = subprocess.run(["bash", str(ROOT / "scripts/stop_serve.sh")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        kill_leftovers(home / "serve")
    assert "worker: stopped" in stop.stdout and "server: stopped" in stop.stdout
    assert not (home / "serve" / "worker.pid").exists()

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT ltable_id, answer, label, valid, model "
                           "FROM wrangle_entity_matching").df()
        runs = con.execute("SELECT status, input_rows, written_rows, metrics, flow_run_name "
                           "FROM wrangle_runs").df()
    assert len(rows) == 20 and rows["valid"].all()
    assert (~rows["answer"]).all() and (rows["model"] == "constant:No").all()
    assert runs["status"].tolist() == ["completed"] and runs["written_rows"][0] == 20
    assert runs["flow_run_name"][0] == "wrangle-entity-matching-beer_test_pairs"
    assert json.loads(runs["metrics"][0])["tp"] == 0
