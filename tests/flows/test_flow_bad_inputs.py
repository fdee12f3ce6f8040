"""Bad inputs fail with a clear error before the flow writes anything."""

from __future__ import annotations

import hashlib

import duckdb
import pytest
from flow_testkit import EM_PARAMS, magellan_frames, make_db

from flows.llms import ModelLoadError
from flows.wrangle import wrangle
from wrangling_tasks import tables
from wrangling_tasks.base import InputError

pytestmark = pytest.mark.usefixtures("prefect_api")


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bad_db(tmp_path):
    frames = magellan_frames()
    frames["empty_pairs"] = frames["em_pairs"].iloc[:0]
    frames["left_no_id"] = frames["em_left"].rename(columns={"id": "key"})
    return make_db(tmp_path / "bad.duckdb", frames)


HOSTILE = 'em_pairs"; DROP TABLE em_left; --'

CASES = {
    "missing table": (dict(table="no_such_table"), tables.TableNotFoundError, "no_such_table"),
    "missing columns": (dict(left_table="left_no_id"), tables.MissingColumnsError, r"\['id'\]"),
    "empty table": (dict(table="empty_pairs"), tables.EmptyTableError, "empty_pairs"),
    "quotes and semicolons": (dict(table=HOSTILE), tables.TableNotFoundError, "DROP TABLE"),
    "model not there": (dict(model="no-such-model-xyz"), ModelLoadError, "no-such-model-xyz"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_any_write(bad_db, case):
    overrides, error, message = CASES[case]
    before = digest(bad_db)
    params = {**EM_PARAMS, "database": str(bad_db), "model": "rule:same", **overrides}
    with pytest.raises(error, match=message):
        wrangle(**params)
    assert digest(bad_db) == before  # not a byte changed: no output table, no run row
    with duckdb.connect(str(bad_db), read_only=True) as con:
        assert not [t for (t,) in con.execute("SHOW TABLES").fetchall() if t.startswith("wrangle")]
        assert con.execute("SELECT count(*) FROM em_left").fetchall()[0][0] == 11


def test_ids_missing_from_an_entity_table_fail_before_any_write(tmp_path):
    frames = magellan_frames()
    frames["em_right"] = frames["em_right"].iloc[:3]
    db = make_db(tmp_path / "ids.duckdb", frames)
    before = digest(db)
    with pytest.raises(InputError, match="not in the right"):
        wrangle(**EM_PARAMS, database=str(db), model="rule:same")
    assert digest(db) == before


def test_a_database_path_that_does_not_exist_is_not_created(tmp_path):
    missing = tmp_path / "typo" / "wrangle.duckdb"
    with pytest.raises(tables.DatabaseNotFoundError, match="typo"):
        wrangle(**EM_PARAMS, database=str(missing), model="rule:same")
    assert not missing.exists() and not missing.parent.exists()


def test_parameters_for_another_task_are_rejected(bad_db):
    before = digest(bad_db)
    with pytest.raises(InputError, match="does not use"):
        wrangle(task="imputation", table="em_pairs", target="name", left_table="em_left",
                database=str(bad_db), model="rule:same")
    assert digest(bad_db) == before
