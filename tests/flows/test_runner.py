"""run_wrangle without Prefect: the DuckDB writer keeps the flow's tables and run record, the Parquet
writer writes the same rows to files (and nothing to the database), and both resume."""

from __future__ import annotations

import duckdb
import pandas as pd
from flow_testkit import EM_PARAMS, magellan_frames, make_db

from flows import partitions as parts
from flows import store
from flows.params import WrangleParams
from flows.runner import run_wrangle
from flows.writers import DuckDBWriter, ParquetWriter

COMPARED = ["run_key", "row_key", "occurrence", "ltable_id", "rtable_id", "prompt_hash", "raw_output",
            "answer", "label", "valid", "model"]


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).df()


def sorted_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["row_key", "occurrence"])[COMPARED].reset_index(drop=True)


def test_the_duckdb_writer_records_the_run_and_resumes(tmp_path):
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=8, odd=(3,)))
    params = WrangleParams(**EM_PARAMS, model="rule:same-or-junk", database=str(db), chunk_size=3)

    first = run_wrangle(params, DuckDBWriter(str(db)))
    again = run_wrangle(params, DuckDBWriter(str(db)))

    assert (first["status"], first["written_rows"], first["quarantined_rows"]) == ("completed", 8, 1)
    assert first["metrics"]["accuracy"] < 1.0 and first["run_id"].startswith("local-")
    assert (again["skipped_rows"], again["written_rows"], again["quarantined_rows"]) == (8, 0, 1)
    runs = query(db, "SELECT run_id, status, written_rows FROM wrangle_runs ORDER BY started_at")
    assert runs.to_dict("records") == [{"run_id": first["run_id"], "status": "completed", "written_rows": 8},
                                       {"run_id": again["run_id"], "status": "completed", "written_rows": 0}]
    assert len(query(db, "SELECT * FROM wrangle_entity_matching")) == 8


def test_the_parquet_writer_writes_the_duckdb_rows_to_files_and_leaves_the_database_alone(tmp_path):
    frames = magellan_frames(n_pairs=8, odd=(3,))
    plain_db, files_db = make_db(tmp_path / "plain.duckdb", frames), make_db(tmp_path / "files.duckdb", frames)
    common = dict(**EM_PARAMS, model="rule:same-or-junk", chunk_size=3)
    run_wrangle(WrangleParams(**common, database=str(plain_db)), DuckDBWriter(str(plain_db)))
    out = tmp_path / "out"
    params = WrangleParams(**common, database=str(files_db))

    done = run_wrangle(params, ParquetWriter(str(files_db), out))

    assert (done["written"], done["items"], done["skipped"]) == (8, 8, 0)
    results = parts.files(out, params.run_key(), "results")
    quarantine = parts.files(out, params.run_key(), "quarantine")
    assert len(results) == 3 and len(quarantine) == 1          # one file per chunk; one chunk had a failure
    with duckdb.connect() as con:
        got = con.execute("SELECT * FROM read_parquet(?)", [[str(p) for p in results]]).df()
        failed = con.execute("SELECT * FROM read_parquet(?)", [[str(p) for p in quarantine]]).df()
    assert list(got.columns) == [c for c, _ in store.result_columns("entity-matching")]
    assert list(failed.columns) == [c for c, _ in store.QUARANTINE_COLUMNS]
    want = query(plain_db, "SELECT * FROM wrangle_entity_matching")
    pd.testing.assert_frame_equal(sorted_rows(got), sorted_rows(want))
    assert failed["row_key"].tolist() == query(plain_db, "SELECT row_key FROM wrangle_quarantine")["row_key"].tolist()
    assert not [t for (t,) in query(files_db, "SHOW TABLES").itertuples(index=False) if t.startswith("wrangle_")]

    again = run_wrangle(params, ParquetWriter(str(files_db), out))   # the files are a resume point
    assert (again["written"], again["skipped"]) == (0, 8) and len(parts.files(out, params.run_key(), "results")) == 3
