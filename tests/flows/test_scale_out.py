"""Table scale-out: partitions cover every row once, Parquet outputs merge idempotently, the
``wrangle-scale-out`` flow writes what ``wrangle`` writes -- in process under the Prefect test
harness, and for real with a Prefect server on loopback and two process workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from flow_testkit import EM_PARAMS, magellan_frames, make_db

from flows import partitions as parts
from flows import steps, store

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PYTHON_BIN_DIR", Path(sys.executable).parent))
COMPARED = ["run_key", "row_key", "occurrence", "ltable_id", "rtable_id", "prompt_hash", "raw_output",
            "answer", "label", "valid", "model"]


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).df()


def items(n: int) -> pd.DataFrame:
    return pd.DataFrame({"row_key": [json.dumps([str(i), str(i)]) for i in range(n)], "occurrence": [0] * n})


# ---- plain functions --------------------------------------------------------------------------
def test_partitions_cover_every_row_exactly_once_and_are_stable():
    frame = items(200)
    shares = [parts.share(frame, i, 3) for i in range(3)]
    keys = [k for s in shares for k in s["row_key"]]
    assert sorted(keys) == sorted(frame["row_key"]) and len(set(keys)) == 200
    assert all(40 < len(s) < 95 for s in shares)                       # roughly even
    grown = items(300)                                                  # rows added later keep their owner
    assert parts.share(grown, 1, 3)["row_key"].tolist()[: len(shares[1])] == shares[1]["row_key"].tolist()
    with pytest.raises(ValueError, match="outside"):
        parts.share(frame, 3, 3)


def _chunk(run_key: str, keys: range, task="entity-matching"):
    ctx = steps.RunContext(task=task, run_key=run_key, run_id="r1", model="m", policy="null")
    preds = pd.DataFrame({"row_key": [json.dumps([str(i), str(i)]) for i in keys],
                          "occurrence": [0] * len(keys), "ltable_id": list(keys), "rtable_id": list(keys),
                          "prompt_hash": ["h"] * len(keys), "raw_output": ["Yes"] * len(keys),
                          "answer": pd.array([True] * len(keys), dtype="boolean"),
                          "label": [1] * len(keys), "n_demos": [0] * len(keys), "truncated": [False] * len(keys)})

    class Ok:
        failed_rows: list = []

        @staticmethod
        def reason(i):
            return None
    return steps.result_rows(ctx, preds, ("ltable_id", "rtable_id"), Ok()), \
        steps.quarantine_rows(ctx, preds, ("ltable_id", "rtable_id"), Ok())


def test_parquet_chunks_merge_once_by_key_in_one_transaction(tmp_path):
    db = tmp_path / "out.duckdb"
    make_db(db, {"dummy": pd.DataFrame({"x": [1]})})
    out = tmp_path / "parts"
    for i, keys in enumerate([range(0, 5), range(5, 8), range(3, 8)]):     # the last chunk retried rows 3..7
        d = parts.partition_dir(out, "rk", i % 2, 2)
        parts.write_chunk(d, "entity-matching", *_chunk("rk", keys))
    assert sorted(parts.written_keys(out, "rk")["row_key"]) == sorted(
        json.dumps([str(i), str(i)]) for i in [*range(8), *range(3, 8)])
    merged = parts.merge(str(db), "entity-matching", out, "rk")
    assert merged["results"] == 8 and merged["files"] == 3
    assert parts.files(out, "rk", "results") == []                         # merged files are removed
    parts.write_chunk(parts.partition_dir(out, "rk", 0, 2), "entity-matching", *_chunk("rk", range(0, 3)))
    assert parts.merge(str(db), "entity-matching", out, "rk")["results"] == 0   # already there
    rows = query(db, "SELECT * FROM wrangle_entity_matching")
    assert len(rows) == 8 and rows["row_key"].is_unique and rows["answer"].all()
    assert rows["created_at"].notna().all() and set(rows["ltable_id"]) == {str(i) for i in range(8)}


# ---- the flow, in process (partitions as subflows) ---------------------------------------------
@pytest.mark.usefixtures("prefect_api")
def test_scale_out_writes_what_wrangle_writes_and_resumes(tmp_path):
    from flows.scale_out import wrangle_scale_out
    from flows.wrangle import wrangle

    frames = magellan_frames(n_pairs=14)
    plain_db, split_db = make_db(tmp_path / "plain.duckdb", frames), make_db(tmp_path / "split.duckdb", frames)
    params = dict(**EM_PARAMS, demos_table="em_demos", model="rule:same", k=1, chunk_size=3)
    plain = wrangle(**params, database=str(plain_db))
    out = wrangle_scale_out(**params, database=str(split_db), partitions=3, deployment=None,
                            output_dir=str(tmp_path / "parts"))

    assert out["run_key"] == plain["run_key"] and out["status"] == "completed"
    assert out["written_rows"] == 14 and sum(out["shares"]) == 14 and len(out["partitions"]) == 3
    assert sum(r["written"] for r in out["partitions"]) == 14
    assert out["metrics"] == plain["metrics"] and out["metrics"]["f1"] == 1.0
    got = query(split_db, "SELECT * FROM wrangle_entity_matching").sort_values("row_key")[COMPARED]
    want = query(plain_db, "SELECT * FROM wrangle_entity_matching").sort_values("row_key")[COMPARED]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert not list((tmp_path / "parts").rglob("*.parquet"))
    runs = query(split_db, "SELECT status, written_rows, input_rows FROM wrangle_runs")
    assert runs.to_dict("records") == [{"status": "completed", "written_rows": 14, "input_rows": 14}]

    again = wrangle_scale_out(**params, database=str(split_db), partitions=2, deployment=None,
                              output_dir=str(tmp_path / "parts"))
    assert again["skipped_rows"] == 14 and again["written_rows"] == 0 and again["partitions"] == []
    assert len(query(split_db, "SELECT * FROM wrangle_entity_matching")) == 14


@pytest.mark.usefixtures("prefect_api")
def test_files_left_by_an_interrupted_run_are_merged_not_redone(tmp_path):
    from flows.scale_out import wrangle_scale_out

    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=6))
    params = dict(**EM_PARAMS, model="rule:same", database=str(db), output_dir=str(tmp_path / "parts"))
    p = steps.WrangleParams(**EM_PARAMS, model="rule:same", database=str(db))
    prompts = steps.build_prompts(p, steps.extract(p), None).items.set_index("row_key")
    # a partition of an earlier attempt answered pair 0 (wrongly, so we can tell) and was cut off
    with duckdb.connect(str(db)) as con:
        store.ensure_schema(con)
    wrong, q = _chunk(p.run_key(), range(0, 1))
    parts.write_chunk(parts.partition_dir(tmp_path / "parts", p.run_key(), 0, 2), "entity-matching",
                      wrong.assign(answer=False, prompt_hash=prompts.loc['["0", "0"]', "prompt_hash"]), q)
    out = wrangle_scale_out(**params, partitions=2, deployment=None)
    rows = query(db, "SELECT ltable_id, answer FROM wrangle_entity_matching ORDER BY ltable_id")
    assert len(rows) == 6 and out["written_rows"] == 6 and sum(out["shares"]) == 5
    assert rows["answer"].tolist() == [False, False, True, False, True, False]   # pair 0 kept, not redone


@pytest.mark.usefixtures("prefect_api")
def test_a_changed_row_is_answered_again_and_the_newest_answer_in_the_files_wins(tmp_path):
    from flows.scale_out import wrangle_scale_out

    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=6))
    params = dict(**EM_PARAMS, model="rule:same", database=str(db), output_dir=str(tmp_path / "parts"),
                  partitions=2, deployment=None)
    first = wrangle_scale_out(**params)
    old = query(db, "SELECT * FROM wrangle_entity_matching WHERE ltable_id = '2'")
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE em_right SET name = 'changed 2' WHERE id = 2")          # pair 2: Yes -> No
    # a cut-off attempt left pair 2's answer under the old prompt in a file: outdated, not a resume point
    stale_file, q = _chunk(first["run_key"], range(2, 3))
    parts.write_chunk(parts.partition_dir(tmp_path / "parts", first["run_key"], 0, 2), "entity-matching",
                      stale_file.assign(prompt_hash=old["prompt_hash"][0], answer=True), q)
    again = wrangle_scale_out(**params)
    assert (again["written_rows"], again["replaced_rows"], again["skipped_rows"]) == (1, 1, 5)
    rows = query(db, "SELECT * FROM wrangle_entity_matching ORDER BY ltable_id")
    assert len(rows) == 6 and rows["row_key"].is_unique
    row = rows[rows["ltable_id"] == "2"].iloc[0]
    assert row["prompt_hash"] != old["prompt_hash"][0] and not row["answer"] and row["run_id"] == again["run_id"]
    assert again["metrics"]["fn"] == 1 and not list((tmp_path / "parts").rglob("*.parquet"))


@pytest.mark.usefixtures("prefect_api")
def test_a_missing_deployment_fails_before_any_write(tmp_path):
    from flows.scale_out import wrangle_scale_out

    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=4))
    with pytest.raises(ValueError, match="deployment 'nope/nope' not found"):
        wrangle_scale_out(**EM_PARAMS, model="rule:same", database=str(db), deployment="nope/nope",
                          output_dir=str(tmp_path / "parts"))
    with duckdb.connect(str(db), read_only=True) as con:
        assert not [t for (t,) in con.execute("SHOW TABLES").fetchall() if t.startswith("wrangle_")]


@pytest.mark.usefixtures("prefect_api")
def test_a_precision_left_to_each_workers_search_is_refused(tmp_path):
    from flows.scale_out import wrangle_scale_out

    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=4))
    with pytest.raises(ValueError, match="cannot leave the precision to the policy search"):
        wrangle_scale_out(**EM_PARAMS, model="rule:same", database=str(db), deployment=None,
                          policy={"auto": True, "compress_weight": None}, output_dir=str(tmp_path / "parts"))


# ---- for real: a Prefect server on loopback and two process workers -----------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (twice for a worker: the first asks it to drain), then SIGKILL its process group."""
    for _ in range(2):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)                   # anything it started (flow runs)
    except ProcessLookupError:
        pass


def _wait_healthy(url: str, seconds: float) -> None:
    import urllib.request
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {seconds} s")
        time.sleep(1)


DEPLOY_YAML = """\
name: flexwrangle-scale-out-test
prefect-version: 3.8.8
build: null
push: null
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{root}"
deployments:
  - name: partition
    entrypoint: flows/scale_out.py:wrangle_partition
    work_pool:
      name: {pool}
"""


@pytest.mark.slow
@pytest.mark.server
def test_two_workers_each_answer_a_share_with_their_own_engine(tmp_path, tiny_engine_model):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
           "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PYTHONPATH": str(ROOT)}
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=12))
    (tmp_path / "deploy.yaml").write_text(DEPLOY_YAML.format(root=ROOT, pool="scale-out-test"))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env, tmp_path / "server.log"))
        _wait_healthy(f"{api}/health", 180)
        for cmd in (["work-pool", "create", "scale-out-test", "--type", "process"],
                    ["--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "deploy.yaml")]):
            done = subprocess.run([str(BIN / "prefect"), *cmd], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        workers = [_start([str(BIN / "prefect"), "worker", "start", "--pool", "scale-out-test", "--limit", "1",
                           "--name", f"worker-{i}"], env, tmp_path / f"worker-{i}.log") for i in range(2)]
        procs += workers
        params = dict(**EM_PARAMS, demos_table="em_demos", k=1, database=str(db), model=str(tiny_engine_model),
                      policy={"gpu_batch_size": 4}, chunk_size=4, partitions=2,
                      deployment="wrangle-partition/partition", output_dir=str(tmp_path / "parts"),
                      poll_seconds=1.0)
        code = ("import json, sys; from flows.scale_out import wrangle_scale_out; "
                "print('RESULT ' + json.dumps(wrangle_scale_out(**json.loads(sys.argv[1])), default=str))")
        parent = subprocess.run([sys.executable, "-c", code, json.dumps(params)], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert parent.returncode == 0, parent.stdout[-3000:] + parent.stderr[-5000:]
        out = json.loads(parent.stdout.split("RESULT ", 1)[1])
    finally:
        for proc in reversed(procs):
            _stop(proc, grace=10)
        shutil.rmtree(home, ignore_errors=True)
    assert all(p.poll() is not None for p in procs)

    reports = out["partitions"]
    assert sorted(r["partition"] for r in reports) == [0, 1]
    assert {r["ppid"] for r in reports} == {w.pid for w in workers}    # one share per worker process
    assert all(r["written"] == share for r, share in zip(sorted(reports, key=lambda r: r["partition"]),
                                                          out["shares"]))
    assert out["written_rows"] == 12 and all(r["tokens"] for r in reports)   # the engine generated
    rows = query(db, "SELECT * FROM wrangle_entity_matching")
    assert len(rows) == 12 and rows["row_key"].is_unique and (rows["model"] == str(tiny_engine_model)).all()
    runs = query(db, "SELECT status, written_rows FROM wrangle_runs")
    assert runs.to_dict("records") == [{"status": "completed", "written_rows": 12}]
