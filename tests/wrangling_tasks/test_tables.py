"""wrangling_tasks.tables: quoted identifiers, bound values, transactions, short connections."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from wrangling_tasks import tables as tb


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.duckdb"
    with tb.connect(path, create=True) as con:
        tb.replace_tables(con, {"people": pd.DataFrame({"id": [3, 1, 2], "name": ["c", "a", "b"]})})
    return path


def test_quote_ident_doubles_quotes_and_rejects_empty():
    assert tb.quote_ident("plain") == '"plain"'
    assert tb.quote_ident('a"b; DROP TABLE x; --') == '"a""b; DROP TABLE x; --"'
    for bad in ("", "a\x00b", None):
        with pytest.raises(tb.TableError):
            tb.quote_ident(bad)


def test_connect_refuses_a_missing_file_unless_asked_to_create(tmp_path):
    missing = tmp_path / "nope.duckdb"
    with pytest.raises(tb.DatabaseNotFoundError, match="nope.duckdb"):
        with tb.connect(missing):
            pass
    assert not missing.exists()
    with pytest.raises(tb.DatabaseNotFoundError, match="directory"):
        with tb.connect(tmp_path / "no-dir" / "x.duckdb", create=True):
            pass
    with tb.connect(missing, create=True) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    assert missing.exists()


def test_an_input_view_cannot_read_local_files(db, tmp_path):
    """Input databases are read without external access: a view over a local file (or a URL) in
    someone else's database fails with a clear error instead of handing the file to the flow."""
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    with tb.connect(db) as con:
        con.execute(f"CREATE VIEW leak AS SELECT * FROM read_csv('{secret}')")
    with tb.connect(db, read_only=True) as con:
        assert tb.read_table(con, "people")["id"].tolist() == [3, 1, 2]          # tables read as before
        with pytest.raises(tb.TableError, match="reads files or URLs outside the database"):
            tb.read_table(con, "leak")
        settings = con.execute("SELECT current_setting('enable_external_access'), "
                               "current_setting('autoload_known_extensions'), "
                               "current_setting('autoinstall_known_extensions')").fetchone()
        assert settings == (False, False, False)                              # no extension loads itself


def test_read_table_keeps_stored_order_and_binds_limit(db):
    with tb.connect(db, read_only=True) as con:
        assert tb.read_table(con, "people")["id"].tolist() == [3, 1, 2]
        assert tb.read_table(con, "people", ["name"], limit=2)["name"].tolist() == ["c", "a"]
        assert tb.count_rows(con, "people") == 3


def test_hostile_names_are_identifiers_not_sql(db):
    hostile = 'people"; DROP TABLE people; --'
    with tb.connect(db) as con:
        with pytest.raises(tb.TableNotFoundError, match="table not found"):
            tb.require_table(con, hostile)
        # a table may really have such a name: it round-trips as data
        tb.replace_tables(con, {hostile: pd.DataFrame({"x": [1]})})
        assert tb.read_table(con, hostile)["x"].tolist() == [1]
        assert tb.count_rows(con, "people") == 3


def test_require_table_reports_missing_columns_and_empty_tables(db):
    with tb.connect(db) as con:
        con.execute("CREATE TABLE empty (id INTEGER)")
        assert tb.require_table(con, "people", ["id", "name"]) == ["id", "name"]
        with pytest.raises(tb.MissingColumnsError, match=r"\['label'\]"):
            tb.require_table(con, "people", ["id", "label"])
        with pytest.raises(tb.EmptyTableError, match="empty"):
            tb.require_table(con, "empty")
        tb.require_table(con, "empty", non_empty=False)


def test_replace_tables_is_all_or_nothing(db):
    good = pd.DataFrame({"id": [9], "name": ["z"]})
    with tb.connect(db) as con:
        with pytest.raises(tb.TableError):
            tb.replace_tables(con, {"people": good, "": good})  # second name is invalid
        assert tb.read_table(con, "people")["id"].tolist() == [3, 1, 2]  # rolled back


def test_insert_frame_ignores_existing_keys_when_asked(db):
    with tb.connect(db) as con:
        con.execute("CREATE TABLE k (id INTEGER PRIMARY KEY, v VARCHAR)")
        rows = pd.DataFrame({"id": [1, 2], "v": ["a", "b"]})
        tb.insert_frame(con, "k", rows)
        tb.insert_frame(con, "k", rows, ignore_conflicts=True)  # a retried write: no-op
        assert tb.count_rows(con, "k") == 2
        with pytest.raises(duckdb.ConstraintException):
            tb.insert_frame(con, "k", rows)


def test_transaction_rolls_back_on_error(db):
    with tb.connect(db) as con:
        with pytest.raises(RuntimeError):
            with tb.transaction(con):
                con.execute("DELETE FROM people")
                raise RuntimeError("boom")
        assert tb.count_rows(con, "people") == 3


def test_connect_waits_for_another_process_lock_then_gives_up(db):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
         "time.sleep(float(sys.argv[2]))", str(db), "1.5"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(tb.DatabaseLockedError, match="is locked by"):
            with tb.connect(db, read_only=True, lock_timeout_s=0):
                pass
        with tb.connect(db, read_only=True, lock_timeout_s=60) as con:  # retried until released
            assert tb.count_rows(con, "people") == 3
    finally:
        holder.kill()
        holder.wait()
