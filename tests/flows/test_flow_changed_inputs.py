"""Resume against edited inputs: a row whose prompt changed is answered again (its old answer and
quarantine replaced), a row gone from the input is kept but marked stale and no longer scored, a
corrected label needs no new answer, and tables without a key column are keyed by content."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest
from flow_testkit import EM_PARAMS, magellan_frames, make_db, same

from flows.wrangle import wrangle
from wrangling_tasks import tables

pytestmark = pytest.mark.usefixtures("prefect_api")


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).df()


def edit(db, sql, params=()):
    with tables.connect(db) as con:
        con.execute(sql, list(params))


def scores(db, run_key):
    return query(db, "SELECT * FROM wrangle_scores WHERE run_key = ?", [run_key]).iloc[0]


def test_changed_rows_are_answered_again_and_deleted_rows_are_kept_stale_not_scored(tmp_path):
    db = make_db(tmp_path / "em.duckdb", magellan_frames(n_pairs=10, odd=(3,)))
    args = dict(**EM_PARAMS, database=str(db), model="rule:same-or-junk", chunk_size=3)
    first = wrangle(**args)
    assert first["quarantined_rows"] == 1                        # pair 3 ("odd 3") got no answer
    before = query(db, "SELECT * FROM wrangle_entity_matching").set_index("ltable_id")

    edit(db, "UPDATE em_left SET name = 'item 3' WHERE id = 3")         # now answerable: No
    edit(db, "UPDATE em_right SET name = 'changed 4' WHERE id = 4")     # was the same record: Yes -> No
    edit(db, "UPDATE em_pairs SET label = 0 WHERE ltable_id = 6")       # a corrected gold label
    edit(db, "DELETE FROM em_pairs WHERE ltable_id = 9")
    second = wrangle(**args)

    assert second["run_key"] == first["run_key"]
    assert (second["input_rows"], second["skipped_rows"], second["written_rows"]) == (9, 7, 2)
    assert (second["replaced_rows"], second["stale_rows"], second["quarantined_rows"]) == (2, 1, 0)
    rows = query(db, "SELECT * FROM wrangle_entity_matching").set_index("ltable_id")
    assert len(rows) == 10 and rows.index.is_unique                  # replaced in place, the stale row kept
    for i in ("3", "4"):                                             # new prompt, new answer, this attempt's
        assert rows.loc[i, "prompt_hash"] != before.loc[i, "prompt_hash"]
        assert rows.loc[i, "run_id"] == second["run_id"] and rows.loc[i, "valid"]
    assert not rows.loc["4", "answer"] and not rows.loc["3", "answer"]
    assert rows.loc["6", "run_id"] == first["run_id"] and not rows.loc["6", "label"]   # label only
    assert pd.notna(rows.loc["9", "stale_since"]) and rows.drop(index="9")["stale_since"].isna().all()
    assert query(db, "SELECT count(*) AS n FROM wrangle_quarantine")["n"][0] == 0    # pair 3's reason went with it
    score = scores(db, second["run_key"])
    assert score["rows"] == 9 and second["metrics"]["n"] == 9
    assert (score["tp"], score["fp"], score["fn"], score["tn"]) == tuple(
        second["metrics"][k] for k in ("tp", "fp", "fn", "tn"))
    assert (second["metrics"]["fn"], second["metrics"]["fp"]) == (1, 1)   # pair 4 now a miss; pair 6's Yes, wrong now
    runs = query(db, "SELECT status, written_rows, replaced_rows, stale_rows FROM wrangle_runs ORDER BY started_at")
    assert runs.to_dict("records")[1] == {"status": "completed", "written_rows": 2, "replaced_rows": 2,
                                          "stale_rows": 1}

    edit(db, "INSERT INTO em_pairs VALUES (9, 9, 0)")                # the deleted pair comes back unchanged
    third = wrangle(**args)
    assert (third["written_rows"], third["stale_rows"], third["skipped_rows"]) == (0, 0, 10)
    assert query(db, "SELECT count(*) AS n FROM wrangle_entity_matching WHERE stale_since IS NOT NULL")["n"][0] == 0
    assert scores(db, third["run_key"])["rows"] == 10


def test_a_duplicate_key_removed_from_the_input_leaves_the_quarantine(tmp_path):
    frames = magellan_frames(n_pairs=6)
    frames["em_pairs"] = pd.concat([frames["em_pairs"], frames["em_pairs"].iloc[[2]]])
    db = make_db(tmp_path / "d.duckdb", frames)
    args = dict(**EM_PARAMS, database=str(db), model="rule:same")
    assert wrangle(**args)["quarantined_rows"] == 2
    edit(db, "CREATE OR REPLACE TABLE em_pairs AS SELECT DISTINCT * FROM em_pairs ORDER BY ltable_id")
    again = wrangle(**args)
    assert (again["quarantined_rows"], again["valid_rows"], again["written_rows"], again["stale_rows"]) == (0, 6, 0, 1)
    rows = query(db, "SELECT row_key, occurrence, valid, stale_since FROM wrangle_entity_matching "
                     "WHERE row_key = '[\"2\", \"2\"]' ORDER BY occurrence")
    assert rows["valid"].tolist() == [True, False] and rows["stale_since"].notna().tolist() == [False, True]
    assert query(db, "SELECT count(*) AS n FROM wrangle_quarantine WHERE occurrence = 0")["n"][0] == 0


def _pairs(names: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"left_name": [a for a, _ in names], "right_name": [b for _, b in names],
                         "label": [int(a == b) for a, b in names]})


def test_a_table_without_keys_is_keyed_by_content_so_inserts_and_deletes_move_no_answer(tmp_path):
    names = [("a", "a"), ("b", "x"), ("c", "c"), ("c", "c"), ("d", "y")]         # rows 2 and 3 identical
    db = make_db(tmp_path / "p.duckdb", {"pairs": _pairs(names)})
    args = dict(task="entity-matching", table="pairs", database=str(db), model="rule:same")
    first = wrangle(**args)
    assert first["written_rows"] == 5
    keys = query(db, "SELECT row_key, occurrence FROM wrangle_entity_matching")
    assert all(json.loads(k).keys() == {"content"} for k in keys["row_key"])
    assert sorted(keys["occurrence"]) == [0, 0, 0, 0, 1]

    edited = [("new", "new"), *names[:1], *names[2:]]              # a row inserted on top, ("b", "x") deleted
    make_db(db, {"pairs": _pairs(edited)})
    second = wrangle(**args)
    assert (second["written_rows"], second["skipped_rows"], second["stale_rows"]) == (1, 4, 1)
    rows = query(db, "SELECT pair_id, answer, raw_output, stale_since FROM wrangle_entity_matching")
    live = rows[rows["stale_since"].isna()].astype({"pair_id": int}).sort_values("pair_id")
    assert live["pair_id"].tolist() == [0, 1, 2, 3, 4]              # positions as of this run
    want = [same(f" A is name: {a}. Product B is name: {b}. Are Product A and Product B the same?") for a, b in edited]
    assert live["raw_output"].tolist() == want                      # every answer is its own row's
    assert scores(db, second["run_key"])["rows"] == 5 and second["metrics"]["f1"] == 1.0
