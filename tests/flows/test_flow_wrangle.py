"""The wrangle flow end to end under a Prefect test server, with deterministic fake models."""

from __future__ import annotations

import json
import shutil

import duckdb
import pandas as pd
import pytest
from flow_testkit import EM_PARAMS, magellan_frames, make_db

import wrangling_tasks as wt
from flows.load_benchmarks import load_benchmarks
from flows.wrangle import wrangle

pytestmark = pytest.mark.usefixtures("prefect_api")


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).df()


@pytest.fixture(scope="module")
def bench_master(tmp_path_factory, prefect_api):
    """Beer, Restaurant and Hospital loaded by the load-benchmarks flow (once per module)."""
    db = tmp_path_factory.mktemp("bench") / "bench.duckdb"
    counts = load_benchmarks(datasets=["Beer", "Restaurant", "Hospital"], database=str(db))
    return db, counts


@pytest.fixture
def bench_db(bench_master, tmp_path):
    db = tmp_path / "bench.duckdb"
    shutil.copy(bench_master[0], db)
    return db


def test_load_benchmarks_writes_named_tables(bench_master):
    db, counts = bench_master
    assert counts["beer_table_a"] == 4345 and counts["beer_table_b"] == 3000
    assert counts["beer_test_pairs"] == 91 and counts["beer_train_pairs"] == 268
    assert counts["restaurant_test"] == counts["restaurant_test_masked"] == 86
    assert counts["hospital_test_cells"] == 17101
    masked = query(db, "SELECT count(*) AS n FROM restaurant_test_masked WHERE city IS NULL")
    assert masked["n"][0] == 86


def test_entity_matching_end_to_end(bench_db):
    out = wrangle(task="entity-matching", table="beer_test_pairs", left_table="beer_table_a",
                  right_table="beer_table_b", demos_table="beer_train_pairs", spec="Beer",
                  database=str(bench_db), model="rule:same", k=2, limit=12, chunk_size=5)
    # Same prompts and the same scores as wrangling_tasks on the CSV files.
    inputs = wt.load_benchmark("entity-matching", "Beer", "test")
    from flow_testkit import RuleLLM, same
    ref = wt.run("entity-matching", inputs, RuleLLM(same), k=2, limit=12, progress=False)

    rows = query(bench_db, "SELECT * FROM wrangle_entity_matching ORDER BY created_at")
    assert len(rows) == 12 and rows["valid"].all()
    by_key = rows.set_index(["ltable_id", "rtable_id"])
    for _, r in ref.predictions.iterrows():
        got = by_key.loc[(str(r["ltable_id"]), str(r["rtable_id"]))]
        assert got["prompt_hash"] == r["prompt_hash"]
        assert bool(got["answer"]) == bool(r["answer"]) and bool(got["label"]) == bool(r["label"])
    assert out["metrics"] == ref.metrics
    assert out["written_rows"] == 12 and out["quarantined_rows"] == 0

    run = query(bench_db, "SELECT * FROM wrangle_runs").iloc[0]
    assert run["status"] == "completed" and run["input_rows"] == 12
    assert json.loads(run["metrics"]) == ref.metrics
    assert json.loads(run["parameters"])["table"] == "beer_test_pairs"
    score = query(bench_db, "SELECT * FROM wrangle_scores WHERE run_key = ?", [out["run_key"]])
    assert score["f1"][0] == pytest.approx(ref.metrics["f1"])
    assert score["tp"][0] == ref.metrics["tp"] and score["fp"][0] == ref.metrics["fp"]


def test_same_parameters_resume_and_a_larger_limit_adds_only_new_rows(em_db):
    first = wrangle(**EM_PARAMS, database=str(em_db), model="rule:same", limit=4)
    again = wrangle(**EM_PARAMS, database=str(em_db), model="rule:same", limit=4)
    more = wrangle(**EM_PARAMS, database=str(em_db), model="rule:same")
    assert first["run_key"] == again["run_key"] == more["run_key"]
    assert (again["skipped_rows"], again["written_rows"]) == (4, 0)
    assert (more["skipped_rows"], more["written_rows"]) == (4, 6)
    rows = query(em_db, "SELECT row_key, run_id FROM wrangle_entity_matching")
    assert len(rows) == 10 and rows["row_key"].is_unique
    assert rows["run_id"].nunique() == 2  # written by the first and the third attempt
    assert query(em_db, "SELECT count(*) AS n FROM wrangle_runs")["n"][0] == 3
    other = wrangle(**EM_PARAMS, database=str(em_db), model="rule:same", tag="fresh")
    assert other["run_key"] != first["run_key"] and other["written_rows"] == 10


def test_unparseable_answers_are_quarantined_not_dropped(tmp_path):
    db = make_db(tmp_path / "q.duckdb", magellan_frames(odd=(1, 4)))
    out = wrangle(**EM_PARAMS, database=str(db), model="rule:same-or-junk")
    rows = query(db, "SELECT * FROM wrangle_entity_matching")
    assert len(rows) == 10  # every input row is in the results
    bad = rows[~rows["valid"]]
    assert sorted(bad["ltable_id"]) == ["1", "4"] and bad["answer"].isna().all()
    q = query(db, "SELECT * FROM wrangle_quarantine")
    assert sorted(q["row_key"]) == ['["1", "1"]', '["4", "4"]']
    assert (q["reason"] == "answer is null").all() and (q["raw_output"] == "Maybe?").all()
    assert out["quarantined_rows"] == 2 and out["valid_rows"] == 8
    run = query(db, "SELECT quarantined_rows, status FROM wrangle_runs").iloc[0]
    assert run["quarantined_rows"] == 2 and run["status"] == "completed"
    # unanswered rows count as wrong, in the flow's metrics and in the SQL view alike
    score = query(db, "SELECT * FROM wrangle_scores").iloc[0]
    assert score["unanswered"] == out["metrics"]["unanswered"] == 2
    assert score["f1"] == pytest.approx(out["metrics"]["f1"])


def test_duplicate_keys_are_kept_and_quarantined(tmp_path):
    frames = magellan_frames()
    frames["em_pairs"] = pd.concat([frames["em_pairs"], frames["em_pairs"].iloc[[2]]])
    db = make_db(tmp_path / "d.duckdb", frames)
    out = wrangle(**EM_PARAMS, database=str(db), model="rule:same", chunk_size=4)
    rows = query(db, "SELECT row_key, occurrence, valid FROM wrangle_entity_matching")
    assert len(rows) == 11
    dup = rows[rows["row_key"] == '["2", "2"]'].sort_values("occurrence")
    assert dup["occurrence"].tolist() == [0, 1] and not dup["valid"].any()
    q = query(db, "SELECT reason FROM wrangle_quarantine")
    assert set(q["reason"]) == {"duplicate key (ltable_id, rtable_id)"}
    assert out["quarantined_rows"] == 2


def test_imputation_and_error_detection_on_benchmark_tables(bench_db):
    imp = wrangle(task="imputation", table="restaurant_test_masked", target="city",
                  labels_table="restaurant_test", demos_table="restaurant_train",
                  spec="Restaurant", database=str(bench_db), model="constant:san francisco",
                  k=1, limit=10)
    rows = query(bench_db, "SELECT * FROM wrangle_imputation")
    assert len(rows) == 10 and (rows["target"] == "city").all() and rows["label"].notna().all()
    assert (rows["answer"] == "san francisco").all()
    score = query(bench_db, "SELECT accuracy FROM wrangle_scores WHERE task = 'imputation'")
    assert score["accuracy"][0] == pytest.approx(imp["metrics"]["accuracy"])

    ed = wrangle(task="error-detection", table="hospital_table", cells_table="hospital_test_cells",
                 labels_table="hospital_test_labels", spec="Hospital", database=str(bench_db),
                 model="constant:No", limit=15)
    rows = query(bench_db, "SELECT * FROM wrangle_error_detection")
    assert len(rows) == 15 and rows["col_name"].notna().all() and rows["valid"].all()
    assert ed["metrics"]["tp"] == 0 and ed["metrics"]["n"] == 15
    runs = query(bench_db, "SELECT task, status FROM wrangle_runs ORDER BY started_at")
    assert runs["task"].tolist() == ["imputation", "error-detection"]
    assert (runs["status"] == "completed").all()


def test_a_tight_budget_puts_weights_on_disk_writes_every_row_and_records_the_policy(tmp_path, wider_engine_model):
    """policy "auto" inside caps that cannot hold the weights in RAM whatever the search chooses
    (768 KiB for float32 compute copies and buffers, 64 KiB of CPU tier, 1 MiB of weights): part of
    them go to disk (a folder next to the database, removed after the run), every row is answered,
    and the run record says which policy ran and what each tier held at its peak."""
    model = str(wider_engine_model)
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=6))
    out = wrangle(**EM_PARAMS, demos_table="em_demos", k=1, database=str(db), model=model,
                  policy="auto", gpu_mem="768KB", cpu_mem="64KB")
    assert out["written_rows"] == 6 and out["valid_rows"] + out["quarantined_rows"] == 6
    run = query(db, "SELECT policy, budget, peak_bytes, peak_rss_bytes FROM wrangle_runs").iloc[0]
    policy, peaks = json.loads(run["policy"]), json.loads(run["peak_bytes"])
    assert policy["w_gpu_percent"] + policy["w_cpu_percent"] < 100 and peaks["disk"] > 0
    assert not policy["compress_weight"] and not policy["int8_matmul"]     # "auto" keeps the precision
    assert peaks["gpu"] <= 768 * 1024 and peaks["cpu"] <= 64 * 1024 and run["peak_rss_bytes"] > 0
    assert json.loads(run["budget"])["cpu_mem"] == "64KB"
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())
    # the same answers as with no budget at all (a placement never changes the tokens)
    free_db = make_db(tmp_path / "free.duckdb", magellan_frames(n_pairs=6))
    wrangle(**EM_PARAMS, demos_table="em_demos", k=1, database=str(free_db), model=model,
            policy={"gpu_batch_size": 1})
    sql = "SELECT row_key, raw_output FROM wrangle_entity_matching ORDER BY row_key"
    assert query(db, sql).equals(query(free_db, sql))


def test_a_budget_no_policy_fits_fails_before_any_write_with_the_searchs_reason(tmp_path, tiny_engine_model):
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=6))
    with pytest.raises(Exception, match="does not fit the memory budget.*short by"):
        wrangle(**EM_PARAMS, demos_table="em_demos", k=1, database=str(db), model=str(tiny_engine_model),
                policy="auto", gpu_mem="1KB", cpu_mem="1KB", disk_mem="1KB")
    tables_now = query(db, "SELECT table_name FROM information_schema.tables")["table_name"].tolist()
    assert "wrangle_runs" not in tables_now or query(db, "SELECT count(*) AS n FROM wrangle_runs")["n"][0] == 0


@pytest.mark.parametrize("bad", [dict(cpu_mem="two gigabytes"), dict(gpu_mem=-1),
                                 dict(policy={"auto": True, "gpu_batch_size": 4})])
def test_budget_parameters_are_checked_up_front(em_db, bad):
    with pytest.raises(Exception, match="is not a size|automatic policy takes only"):
        wrangle(**EM_PARAMS, database=str(em_db), model="rule:same", **bad)


def test_a_precision_left_to_the_search_is_named_in_the_run_key(tmp_path, wider_engine_model):
    """{"auto": true, "compress_weight": null}: the search may choose 4-bit weights, and the run key
    then says what it chose, so a 4-bit run never resumes into a float16 run's rows."""
    from flows.params import WrangleParams
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=4))
    policy = {"auto": True, "compress_weight": None}
    args = dict(**EM_PARAMS, demos_table="em_demos", k=1, database=str(db), model=str(wider_engine_model))
    out = wrangle(**args, policy=policy, gpu_mem="768KB", cpu_mem="64KB")
    chosen = json.loads(out["policy"])
    params = WrangleParams(**args, policy=policy)
    assert params.precision_left_to_search() and not WrangleParams(**args, policy="auto").precision_left_to_search()
    precision = {f: chosen[f] for f in ("compress_weight", "compress_cache", "int8_matmul")}
    assert out["run_key"] == params.run_key(precision)
    assert params.run_key(precision) != params.run_key(dict(precision, compress_weight=not precision["compress_weight"]))
