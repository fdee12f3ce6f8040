"""Hostile identifiers -- table and column names with quotes, spaces, semicolons, SQL keywords, unicode,
newlines, placeholders -- and hostile key values go through extract and write-back as plain names:
every task reads them, writes one row per item keyed by them (results and quarantine), and no input
table changes. The soak draws fresh names from hostile fragments in every trial.
"""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from fault_kit import ledger, trials
from flow_testkit import make_db

from flows.wrangle import wrangle
from wrangling_tasks import imputation, tables
from wrangling_tasks.base import InputError

CURATED = ['we"ird; DROP TABLE canary; --', "select", "naïve café 表 🍺", "a b", "x'y", "?", "$1",
           "%s {0}", "line\nbreak", "Robert'); DROP TABLE canary;--", "ORDER", " lead and trail ",
           "back\\slash", "`tick` [bracket]", "dot.ted", "/* comment */"]
FRAGMENTS = ['"', "'", ";", " ", "--", "/*", "*/", "select", "DROP TABLE canary", "表", "🍺", "é", "\n",
             "\t", "?", "$1", "%s", "{0}", "\\", "`", "[x]", ".", "NULL", "order by", "0x"]
ROLES = ("pairs", "left", "right", "demos", "attr1", "attr2", "attr3", "imp", "target", "imp_attr",
         "labels", "ed", "col1", "col2", "cells")
KEYS = ["r'1", 'r"2', "r;3 --", "表 4", "r\n5", "NULL"]      # row and entity ids (text)
ANSWER = """O'Hare "x"; DROP TABLE canary; --"""          # the imputation model's constant answer


def fuzzed_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct names made of hostile fragments (DuckDB matches names case-insensitively)."""
    names: dict[str, str] = {}
    while len(names) < n:
        name = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4)))
        if name.strip() and name.lower() != "canary" and not name.lower().startswith("wrangle_"):
            names.setdefault(name.lower(), name)
    return list(names.values())


def hostile_db(path, names: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Input tables for the three tasks under hostile names; returns what was written."""
    n = names
    ids = KEYS[:4]
    left = pd.DataFrame({"id": ids, n["attr1"]: ["ale", "stout", "lager", "bock"],
                         n["attr2"]: ["x", "y", "z", "w"]})
    right = left.copy()
    right[n["attr2"]] = ["x", "other", "z", "other"]
    frames = {
        n["pairs"]: pd.DataFrame({"ltable_id": ids, "rtable_id": ids, "label": [1, 0, 1, 0]}),
        n["left"]: left, n["right"]: right,
        n["demos"]: pd.DataFrame({"ltable_id": [ids[0], ids[1]], "rtable_id": [ids[0], ids[2]], "label": [1, 0]}),
        n["imp"]: pd.DataFrame({"row_id": KEYS, n["target"]: [None, None, None, "known", None, "known"],
                                n["imp_attr"]: list("abcdef")}),
        n["labels"]: pd.DataFrame({"row_id": KEYS, n["target"]: [imputation.parse(ANSWER)] * len(KEYS)}),
        n["ed"]: pd.DataFrame({"row_id": KEYS, n["col1"]: list("uvwxyz"), n["col2"]: list("UVWXYZ")}),
        n["cells"]: pd.DataFrame({"row_id": KEYS[:4], "col_name": [n["col1"], n["col2"], n["col2"], n["col1"]]}),
        "canary": pd.DataFrame({"x": [1]}),
    }
    make_db(path, frames)
    return frames


def read_all(db, names) -> dict[str, pd.DataFrame]:
    with tables.connect(db, read_only=True) as con:
        return {name: tables.read_table(con, name) for name in names}


def results(db, table: str, run_key: str) -> pd.DataFrame:
    with tables.connect(db, read_only=True) as con:
        return con.execute(f"SELECT * FROM {tables.quote_ident(table)} WHERE run_key = ?", [run_key]).df()


def run_all_tasks(db, n: dict[str, str]) -> list[tuple[dict, int]]:
    """Every task over the hostile tables; (result, expected rows) per run, each checked by key."""
    out = []
    em = wrangle(task="entity-matching", table=n["pairs"], left_table=n["left"], right_table=n["right"],
                 demos_table=n["demos"], k=1, database=str(db), model="rule:same")
    rows = results(db, "wrangle_entity_matching", em["run_key"])
    assert sorted(zip(rows["ltable_id"], rows["rtable_id"])) == sorted(zip(KEYS[:4], KEYS[:4]))
    assert em["metrics"]["f1"] == pytest.approx(1.0) and rows["valid"].all()
    out.append((em, 4))

    imp = wrangle(task="imputation", table=n["imp"], target=n["target"], labels_table=n["labels"],
                  database=str(db), model=f"constant:{ANSWER}")
    rows = results(db, "wrangle_imputation", imp["run_key"])
    assert sorted(rows["row_id"]) == sorted(KEYS[i] for i in (0, 1, 2, 4))
    assert set(rows["answer"]) == {imputation.parse(ANSWER)} and set(rows["target"]) == {n["target"]}
    assert imp["metrics"]["accuracy"] == 1.0
    out.append((imp, 4))

    cells = wrangle(task="error-detection", table=n["ed"], cells_table=n["cells"], database=str(db),
                    model="constant:Maybe")                     # unparseable: every cell is quarantined
    with tables.connect(db, read_only=True) as con:
        keys = [json.loads(k) for (k,) in con.execute("SELECT keys FROM wrangle_quarantine WHERE run_key = ?",
                                                      [cells["run_key"]]).fetchall()]
    expected = {(r, c) for r, c in zip(KEYS[:4], [n["col1"], n["col2"], n["col2"], n["col1"]])}
    assert {(k["row_id"], k["col_name"]) for k in keys} == expected and cells["quarantined_rows"] == 4
    out.append((cells, 4))

    columns = wrangle(task="error-detection", table=n["ed"], columns=[n["col1"], n["col2"]],
                      database=str(db), model="constant:No")
    rows = results(db, "wrangle_error_detection", columns["run_key"])
    assert sorted(zip(rows["row_id"], rows["col_name"])) == sorted(
        (r, c) for r in KEYS for c in (n["col1"], n["col2"]))
    out.append((columns, 2 * len(KEYS)))
    return out


@trials(fast=1, soak=10)
def test_hostile_names_and_keys_through_every_task(trials, tmp_path, prefect_api, fault_rng, fault_report):
    runs = lost = dups = 0
    used: set[str] = set()
    for i in range(trials):
        pool = CURATED if i == 0 else fuzzed_names(fault_rng, len(ROLES))
        names = dict(zip(ROLES, (pool * 2)[:len(ROLES)] if i == 0 else pool))
        used |= set(names.values())
        db = tmp_path / f"we'ird \"db\" 表; -- {i}.duckdb"
        frames = hostile_db(db, names)

        for result, expected in run_all_tasks(db, names):
            counts = ledger(db, result["task"], result["run_key"], expected)
            assert counts["torn"] == 0
            runs, lost, dups = runs + 1, lost + counts["rows_lost"], dups + counts["duplicates"]

        after = read_all(db, frames)      # the inputs, canary included, are as they were
        for name, frame in frames.items():
            pd.testing.assert_frame_equal(after[name], frame, check_dtype=False, obj=repr(name))
    fault_report("hostile table / column names and key values through every task", trials=runs,
                 faults=len(used), rows_lost=lost, duplicates=dups, outcome="unaffected",
                 note="quotes, semicolons, keywords, unicode, newlines, placeholders; soak: fuzzed names")


@pytest.mark.parametrize("name, error", [("", InputError), ("pairs\x00", tables.TableError)])
def test_names_sql_cannot_hold_fail_before_any_write(name, error, tmp_path, prefect_api, fault_report):
    db = tmp_path / "in.duckdb"
    hostile_db(db, dict(zip(ROLES, [f"t{i}" for i in range(len(ROLES))])))
    before = db.read_bytes()

    with pytest.raises(error, match="required|non-empty"):
        wrangle(task="entity-matching", table=name, left_table="t1", right_table="t2", database=str(db),
                model="constant:No")

    assert db.read_bytes() == before
    fault_report("an empty or NUL table name", trials=1, faults=1, rows_lost=0, duplicates=0,
                 outcome="clear error")


def test_a_registered_frame_never_hides_a_table_of_the_same_name(tmp_path):
    with tables.connect(tmp_path / "x.duckdb", create=True) as con:
        for name in ("__flexwrangle_rows", "__flexwrangle_frame"):
            tables.replace_tables(con, {name: pd.DataFrame({"x": [1]})})
            tables.insert_frame(con, name, pd.DataFrame({"x": [2]}))
            assert tables.read_table(con, name)["x"].tolist() == [1, 2]


@pytest.mark.parametrize("name", ["wrangle_entity_matching", "wrangle_quarantine", "wrangle_runs"])
def test_an_input_table_named_like_an_output_table_fails_clearly_before_any_write(name, em_fault_db, prefect_api):
    db, params = em_fault_db()
    with tables.connect(db) as con:
        tables.replace_tables(con, {name: pd.DataFrame({"x": [1]})})
    before = db.read_bytes()

    with pytest.raises(tables.TableError, match=name):
        wrangle(**params)

    assert db.read_bytes() == before
