"""Where the flows keep their results in DuckDB: the output schema, chunk writes, run records.

Plain Python over :mod:`wrangling_tasks.tables` (no Prefect). Tables:

* ``wrangle_entity_matching`` / ``wrangle_imputation`` / ``wrangle_error_detection``: one row
  per answered item, primary key ``(run_key, row_key, occurrence)``.
* ``wrangle_quarantine``: rows that failed validation, with the reason (they stay in the
  results table too, with ``valid = false``).
* ``wrangle_runs``: one row per flow run (attempt) with its parameters, status and metrics.
* view ``wrangle_scores``: the quality of each logical run computed in SQL from answers and
  gold labels.

``run_key`` names a logical run: a hash of every parameter that can change an answer. A run
that is restarted with the same parameters has the same key, so the rows it already wrote
under the same prompt are skipped (resume); a row whose prompt changed is answered again and
its stored answer replaced; a row gone from the input is marked ``stale_since`` and no longer
scored. ``run_id`` names one attempt (the Prefect flow-run id); one attempt of a run is live at
a time (:mod:`flows.runlock`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import duckdb
import pandas as pd

import wrangling_tasks as wt
from wrangling_tasks import tables

RESULT_TABLES: dict[str, str] = {name: "wrangle_" + name.replace("-", "_") for name in wt.TASKS}
RUNS_TABLE = "wrangle_runs"
QUARANTINE_TABLE = "wrangle_quarantine"
SCORES_VIEW = "wrangle_scores"

# Key columns each results table can hold (stored as text: ids of any type fit, and keys of
# different input layouts share one table; unused ones are NULL).
KEY_COLUMNS: dict[str, tuple[str, ...]] = {name: mod.RESULT_KEY_COLUMNS for name, mod in wt.TASKS.items()}
# Yes/No tasks store booleans (entity matching: True = same entity; error detection: True = the cell
# is wrong), free-text tasks the text (imputation: the filled-in value).
ANSWER_TYPES: dict[str, str] = {name: "BOOLEAN" if mod.allowed_answers else "VARCHAR"
                                for name, mod in wt.TASKS.items()}
EXTRA_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    name: tuple((field, "VARCHAR") for field in mod.RESULT_SPEC_FIELDS) for name, mod in wt.TASKS.items()}

_RESULT_TAIL = (
    ("prompt_hash", "VARCHAR"),
    ("raw_output", "VARCHAR"),
    ("answer", None),   # per task
    ("label", None),    # per task (gold, NULL when unknown)
    ("valid", "BOOLEAN"),
    ("n_demos", "INTEGER"),
    ("truncated", "BOOLEAN"),
    ("run_id", "VARCHAR"),
    ("model", "VARCHAR"),
    ("policy", "VARCHAR"),  # JSON text
    ("created_at", "TIMESTAMP"),  # UTC
    ("stale_since", "TIMESTAMP"),  # UTC; set while the row is not in the run's input (not scored), else NULL
)

RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR PRIMARY KEY"),
    ("run_key", "VARCHAR NOT NULL"),
    ("flow_run_name", "VARCHAR"),
    ("task", "VARCHAR NOT NULL"),
    ("parameters", "VARCHAR"),       # JSON text
    ("model", "VARCHAR"),
    ("policy", "VARCHAR"),           # JSON text: the engine's policy as placed (every field), else the parameter
    ("status", "VARCHAR NOT NULL"),  # running | completed | failed | cancelled | interrupted
    ("started_at", "TIMESTAMP"),
    ("finished_at", "TIMESTAMP"),
    ("seconds", "DOUBLE"),
    ("input_rows", "BIGINT"),        # items this run covered (after limit)
    ("skipped_rows", "BIGINT"),      # already answered under the same prompt by an earlier attempt (resume)
    ("written_rows", "BIGINT"),      # rows this attempt inserted (replacements included)
    ("replaced_rows", "BIGINT"),     # of those: rows answered again because their prompt changed
    ("stale_rows", "BIGINT"),        # the run's stored rows no longer in its input (kept, not scored)
    ("valid_rows", "BIGINT"),
    ("quarantined_rows", "BIGINT"),
    ("rows_per_s", "DOUBLE"),        # written rows / inference seconds
    ("tokens_per_s", "DOUBLE"),      # generated tokens / s, when the model reports it
    ("metrics", "VARCHAR"),          # JSON text: the task's scores over the run's items
    ("error", "VARCHAR"),
    ("budget", "VARCHAR"),           # JSON text: the engine's caps per tier and its offload folder
    ("peak_bytes", "VARCHAR"),       # JSON text: the engine's measured peak bytes per tier
    ("peak_rss_bytes", "BIGINT"),    # the process's peak resident memory
    ("host", "VARCHAR"),             # where the attempt runs, and its process: to find a live one
    ("pid", "BIGINT"),
)

QUARANTINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_key", "VARCHAR NOT NULL"),
    ("row_key", "VARCHAR NOT NULL"),
    ("occurrence", "INTEGER NOT NULL"),
    ("reason", "VARCHAR NOT NULL"),
    ("task", "VARCHAR"),
    ("keys", "VARCHAR"),             # JSON text of the key columns
    ("raw_output", "VARCHAR"),
    ("answer", "VARCHAR"),
    ("run_id", "VARCHAR"),
    ("quarantined_at", "TIMESTAMP"),
)


def utcnow() -> datetime:
    """Naive UTC timestamp (DuckDB ``TIMESTAMP``)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def result_columns(task: str) -> list[tuple[str, str]]:
    """(name, SQL type) of the results table of ``task``, in order."""
    cols = [("run_key", "VARCHAR NOT NULL"), ("row_key", "VARCHAR NOT NULL"),
            ("occurrence", "INTEGER NOT NULL")]
    cols += [(k, "VARCHAR") for k in KEY_COLUMNS[task]]
    cols += list(EXTRA_COLUMNS[task])
    for name, sql_type in _RESULT_TAIL:
        cols.append((name, sql_type or ANSWER_TYPES[task]))
    return cols


def _create(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[tuple[str, str]],
            primary_key: Sequence[str] = ()) -> None:
    body = [f"{tables.quote_ident(c)} {t}" for c, t in columns]
    if primary_key:
        body.append("PRIMARY KEY (" + ", ".join(tables.quote_ident(c) for c in primary_key) + ")")
    con.execute(f"CREATE TABLE IF NOT EXISTS {tables.quote_ident(name)} ({', '.join(body)})")


# Primary keys of the results tables and the quarantine
RESULT_KEY = ("run_key", "row_key", "occurrence")
QUARANTINE_KEY = (*RESULT_KEY, "reason")
# Columns every version of each output table has had (its keys): a table under an output name without
# them is somebody else's
_OWN_COLUMNS: dict[str, tuple[str, ...]] = {
    **{name: RESULT_KEY for name in RESULT_TABLES.values()},
    QUARANTINE_TABLE: QUARANTINE_KEY,
    RUNS_TABLE: ("run_id", "run_key", "task", "status"),
}


def check_output_names(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse, before any write, a database holding a table of its own under one of the output tables'
    names: `CREATE TABLE IF NOT EXISTS` would take it for the output table, and the run would fail later
    with a bare DuckDB error (or, for the quarantine, at the first quarantined row)."""
    for name, own in _OWN_COLUMNS.items():
        have = tables.table_columns(con, name)
        missing = [c for c in own if c not in have]
        if have and missing:
            raise tables.TableError(
                f"the database has a table {name!r} that FlexWrangle did not make (it lacks the column(s) "
                f"{', '.join(missing)}), but FlexWrangle writes its {name!r} output table under that name: "
                "rename that table, or write the run to another database")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the output tables and the scores view if missing (idempotent, one transaction)."""
    check_output_names(con)
    with tables.transaction(con):
        for task, name in RESULT_TABLES.items():
            _create(con, name, result_columns(task), RESULT_KEY)
        _create(con, QUARANTINE_TABLE, QUARANTINE_COLUMNS, QUARANTINE_KEY)
        _create(con, RUNS_TABLE, RUN_COLUMNS)
        # a database written by an older version gains the new columns
        for name, columns in [*((n, result_columns(t)) for t, n in RESULT_TABLES.items()), (RUNS_TABLE, RUN_COLUMNS)]:
            have = set(tables.table_columns(con, name))
            for column, kind in columns:
                if column not in have:
                    con.execute(f"ALTER TABLE {tables.quote_ident(name)} "
                                f"ADD COLUMN {tables.quote_ident(column)} {kind}")
        con.execute(SCORES_SQL)


def _current_rows(answer_type: str) -> str:
    """SQL for the rows not stale of every results table whose answers are ``answer_type``, tagged
    with their task (a query that returns no row when no task has that type)."""
    selects = [f"SELECT '{task}' AS task, run_key, model, answer, label FROM {tables.quote_ident(name)} "
               "WHERE stale_since IS NULL" for task, name in RESULT_TABLES.items() if ANSWER_TYPES[task] == answer_type]
    return "\n    UNION ALL\n    ".join(selects) or (
        f"SELECT NULL::VARCHAR AS task, NULL::VARCHAR AS run_key, NULL::VARCHAR AS model, "
        f"NULL::{answer_type} AS answer, NULL::{answer_type} AS label WHERE false")


# Scores in SQL, with the same rules as wrangling_tasks.scoring: only labelled rows count; an
# unanswered row (answer NULL) counts as wrong; F1 is the true harmonic mean (0 when P+R = 0);
# Yes/No tasks get precision, recall, F1 and accuracy, free-text tasks (imputation) the accuracy of
# case- and whitespace-normalised text. Stale rows (gone from the input) are kept in the tables but
# not scored. Every results table is in the view by its answer type.
SCORES_SQL = f"""
CREATE OR REPLACE VIEW wrangle_scores AS
WITH yes_no AS (
    {_current_rows("BOOLEAN")}
), yes_no_counts AS (
    SELECT task, run_key, any_value(model) AS model, count(*) AS rows,
           count(label) AS labelled,
           count(*) FILTER (WHERE label IS NOT NULL AND answer IS NULL) AS unanswered,
           count(*) FILTER (WHERE label AND coalesce(answer, NOT label)) AS tp,
           count(*) FILTER (WHERE NOT label AND coalesce(answer, NOT label)) AS fp,
           count(*) FILTER (WHERE label AND NOT coalesce(answer, NOT label)) AS fn,
           count(*) FILTER (WHERE NOT label AND NOT coalesce(answer, NOT label)) AS tn
    FROM yes_no GROUP BY task, run_key
), yes_no_scores AS (
    SELECT *,
           coalesce(tp / nullif(tp + fp, 0), 0.0) AS precision,
           coalesce(tp / nullif(tp + fn, 0), 0.0) AS recall
    FROM yes_no_counts
), free_text AS (
    {_current_rows("VARCHAR")}
), free_text_scores AS (
    SELECT task, run_key, any_value(model) AS model, count(*) AS rows,
           count(label) AS labelled,
           count(*) FILTER (WHERE label IS NOT NULL AND answer IS NULL) AS unanswered,
           count(*) FILTER (WHERE lower(regexp_replace(trim(answer), '\\s+', ' ', 'g'))
                                = lower(regexp_replace(trim(label), '\\s+', ' ', 'g'))) AS correct
    FROM free_text GROUP BY task, run_key
)
SELECT task, run_key, model, rows, labelled, unanswered,
       tp, fp, fn, tn, precision, recall,
       coalesce(2 * precision * recall / nullif(precision + recall, 0), 0.0) AS f1,
       coalesce((tp + tn) / nullif(labelled, 0), 0.0) AS accuracy
FROM yes_no_scores
UNION ALL
SELECT task, run_key, model, rows, labelled, unanswered,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       coalesce(correct / nullif(labelled, 0), 0.0)
FROM free_text_scores
"""


def answered_rows(con: duckdb.DuckDBPyConnection, task: str, run_key: str) -> pd.DataFrame:
    """``row_key, occurrence, prompt_hash`` of the rows a run (``run_key``) has already written."""
    name = RESULT_TABLES[task]
    if not tables.table_exists(con, name):
        return pd.DataFrame({"row_key": pd.Series([], dtype=object), "occurrence": pd.Series([], dtype="int64"),
                             "prompt_hash": pd.Series([], dtype=object)})
    return con.execute(
        f"SELECT row_key, occurrence, prompt_hash FROM {tables.quote_ident(name)} WHERE run_key = ?",
        [run_key],
    ).df()


def read_results(con: duckdb.DuckDBPyConnection, task: str, run_key: str) -> pd.DataFrame:
    """Every results row of ``run_key``."""
    return con.execute(
        f"SELECT * FROM {tables.quote_ident(RESULT_TABLES[task])} WHERE run_key = ?", [run_key]
    ).df()


@contextlib.contextmanager
def _registered(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, name: str) -> Iterator[str]:
    """``frame`` as a view ``name`` of ``con`` for the block; yields the quoted name."""
    con.register(name, frame)
    try:
        yield tables.quote_ident(name)
    finally:
        con.unregister(name)


_SAME_ROW = "r.run_key = c.run_key AND r.row_key = c.row_key AND r.occurrence = c.occurrence"


def replace_and_insert(con: duckdb.DuckDBPyConnection, task: str, source: str,
                       newer_only: bool = False) -> tuple[int, int]:
    """Insert the results rows of ``source`` (a quoted view or table in ``con``), inside the caller's
    transaction; returns how many were inserted, and how many of those replaced a stored answer.

    A stored row of the same item answered under another prompt (its input, demonstrations or spec
    changed) is deleted first, with its quarantine rows, so the new answer replaces it. A row stored
    under the same prompt stays (``ON CONFLICT DO NOTHING``): writing a chunk twice is a no-op.
    ``newer_only``: replace only rows older than the incoming ones (files merged late must not undo a
    newer answer).
    """
    name, quarantine = tables.quote_ident(RESULT_TABLES[task]), tables.quote_ident(QUARANTINE_TABLE)
    changed = "r.prompt_hash IS DISTINCT FROM c.prompt_hash"
    if newer_only:
        changed += " AND c.created_at > r.created_at"
    con.execute(f"DELETE FROM {quarantine} q WHERE EXISTS (SELECT 1 FROM {name} r JOIN {source} c ON {_SAME_ROW} "
                f"WHERE {changed} AND q.run_key = r.run_key AND q.row_key = r.row_key AND q.occurrence = r.occurrence)")
    replaced = _count(con.execute(f"DELETE FROM {name} r USING {source} c WHERE {_SAME_ROW} AND {changed}"))
    stored = set(tables.table_columns(con, RESULT_TABLES[task]))
    cols = ", ".join(tables.quote_ident(c) for c in _columns_of(con, source) if c in stored)
    inserted = _count(con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM {source} ON CONFLICT DO NOTHING"))
    return inserted, replaced


def _count(result: duckdb.DuckDBPyConnection) -> int:
    """The row count a DuckDB INSERT / UPDATE / DELETE returns."""
    rows = result.fetchall()
    return int(rows[0][0]) if rows else 0


def _columns_of(con: duckdb.DuckDBPyConnection, source: str) -> list[str]:
    return [d[0] for d in con.execute(f"SELECT * FROM {source} LIMIT 0").description]


def write_chunk(con: duckdb.DuckDBPyConnection, task: str, results: pd.DataFrame,
                quarantine: pd.DataFrame) -> int:
    """Write one chunk's results and its quarantined rows in one transaction; returns the rows inserted.

    Rows already present under the same prompt are left alone, so writing a chunk twice is a no-op
    (idempotent, safe to retry); rows present under another prompt are replaced (see
    :func:`replace_and_insert`).
    """
    with tables.transaction(con), _registered(con, results, "__flexwrangle_chunk") as chunk:
        inserted = replace_and_insert(con, task, chunk)[0] if len(results) else 0
        tables.insert_frame(con, QUARANTINE_TABLE, quarantine, ignore_conflicts=True)
    return inserted


def reconcile(con: duckdb.DuckDBPyConnection, task: str, run_key: str, current: pd.DataFrame,
              present: pd.DataFrame) -> int:
    """Bring a run's stored rows in line with its input before answering; returns its stale rows.

    ``present``: ``row_key, occurrence`` of every item in the input (whatever the limit). Stored rows
    not among them are marked ``stale_since`` (kept, not scored); ``current``: the items this attempt
    covers, with their key columns (as text) and labels: their stored rows are no longer stale, and
    take the current labels (a corrected gold label needs no new answer) and key values (a row keyed
    by its content keeps its position there).
    """
    name = tables.quote_ident(RESULT_TABLES[task])
    keys = [k for k in KEY_COLUMNS[task] if k in current.columns]
    sets = ", ".join([f"label = CAST(c.label AS {ANSWER_TYPES[task]})",
                      *(f"{tables.quote_ident(k)} = c.{tables.quote_ident(k)}" for k in keys)])
    differs = " OR ".join(["r.stale_since IS NOT NULL",
                           f"r.label IS DISTINCT FROM CAST(c.label AS {ANSWER_TYPES[task]})",
                           *(f"r.{tables.quote_ident(k)} IS DISTINCT FROM c.{tables.quote_ident(k)}" for k in keys)])
    with tables.transaction(con):
        with _registered(con, present[["row_key", "occurrence"]], "__flexwrangle_present") as p:
            con.execute(f"UPDATE {name} r SET stale_since = ? WHERE r.run_key = ? AND r.stale_since IS NULL AND NOT "
                        f"EXISTS (SELECT 1 FROM {p} c WHERE c.row_key = r.row_key AND c.occurrence = r.occurrence)",
                        [utcnow(), run_key])
        with _registered(con, current, "__flexwrangle_current") as c:
            con.execute(f"UPDATE {name} r SET stale_since = NULL, {sets} FROM {c} c WHERE r.run_key = ? "
                        f"AND c.row_key = r.row_key AND c.occurrence = r.occurrence AND ({differs})", [run_key])
        return int(con.execute(f"SELECT count(*) FROM {name} WHERE run_key = ? AND stale_since IS NOT NULL",
                               [run_key]).fetchall()[0][0])


def settle_quarantine(con: duckdb.DuckDBPyConnection, task: str, run_key: str, ids: pd.DataFrame,
                      quarantine: pd.DataFrame) -> None:
    """Make the quarantine of the items ``ids`` (``row_key, occurrence``) what the whole-run check
    found (``quarantine``), in one transaction: reasons that no longer hold (a duplicate key removed
    from the input) are deleted, new ones added, and each row's ``valid`` flag set to match."""
    qname, name = tables.quote_ident(QUARANTINE_TABLE), tables.quote_ident(RESULT_TABLES[task])
    ident = ["row_key", "occurrence"]
    ids = ids[ident].astype({"occurrence": "int64"})
    keep = quarantine[[*ident, "reason"]].astype({"occurrence": "int64"})
    have = con.execute(f"SELECT row_key, occurrence, reason FROM {qname} WHERE run_key = ?", [run_key]).df()
    have = have.astype({"occurrence": "int64"}).merge(ids, on=ident)
    gone = have.merge(keep, on=[*ident, "reason"], how="left", indicator=True)
    gone = gone[gone["_merge"] == "left_only"]
    bad = set(zip(keep["row_key"], keep["occurrence"]))
    ids = ids.assign(valid=[(r, o) not in bad for r, o in zip(ids["row_key"], ids["occurrence"])])
    with tables.transaction(con):
        if len(gone):
            con.executemany(f"DELETE FROM {qname} WHERE run_key = ? AND row_key = ? AND occurrence = ? AND reason = ?",
                            [[run_key, r, int(o), why] for r, o, why in zip(gone["row_key"], gone["occurrence"],
                                                                             gone["reason"])])
        tables.insert_frame(con, QUARANTINE_TABLE, quarantine, ignore_conflicts=True)
        with _registered(con, ids, "__flexwrangle_ids") as c:
            con.execute(f"UPDATE {name} r SET valid = c.valid FROM {c} c WHERE r.run_key = ? AND c.row_key = r.row_key "
                        "AND c.occurrence = r.occurrence AND r.valid IS DISTINCT FROM c.valid", [run_key])


def count_quarantined(con: duckdb.DuckDBPyConnection, run_key: str,
                      rows: pd.DataFrame | None = None) -> int:
    """Distinct quarantined rows of ``run_key`` (only those in ``rows`` when given)."""
    q = con.execute(
        f"SELECT DISTINCT row_key, occurrence FROM {tables.quote_ident(QUARANTINE_TABLE)} "
        "WHERE run_key = ?", [run_key]).df()
    if rows is not None:
        q = q.merge(rows[["row_key", "occurrence"]], on=["row_key", "occurrence"])
    return len(q)


def written_by(con: duckdb.DuckDBPyConnection, task: str, run_key: str, run_id: str) -> int:
    """Rows of ``run_key`` that attempt ``run_id`` wrote (each row names its writer: exact however
    often a chunk's write was retried)."""
    return int(con.execute(f"SELECT count(*) FROM {tables.quote_ident(RESULT_TABLES[task])} "
                           "WHERE run_key = ? AND run_id = ?", [run_key, run_id]).fetchall()[0][0])


def start_run(con: duckdb.DuckDBPyConnection, record: Mapping[str, Any]) -> None:
    """Insert the ``running`` row of an attempt. The caller holds the run's lock
    (:mod:`flows.runlock`), so any other ``running`` attempt of the same run is dead (killed
    without a chance to record it): those become ``interrupted``."""
    row = {c: record.get(c) for c, _ in RUN_COLUMNS}
    row["status"] = "running"
    row["started_at"] = row["started_at"] or utcnow()
    with tables.transaction(con):
        con.execute(
            f"UPDATE {tables.quote_ident(RUNS_TABLE)} SET status = 'interrupted' "
            "WHERE run_key = ? AND status = 'running' AND run_id <> ?",
            [row["run_key"], row["run_id"]],
        )
        cols = list(row)
        con.execute(
            f"INSERT OR REPLACE INTO {tables.quote_ident(RUNS_TABLE)} "
            f"({', '.join(tables.quote_ident(c) for c in cols)}) "
            f"VALUES ({', '.join('?' for _ in cols)})",
            [row[c] for c in cols],
        )


def finish_run(con: duckdb.DuckDBPyConnection, run_id: str, **fields: Any) -> None:
    """Update an attempt's row (status, counts, metrics...); dicts are stored as JSON text."""
    known = {c for c, _ in RUN_COLUMNS} - {"run_id"}
    unknown = set(fields) - known
    if unknown:
        raise KeyError(f"unknown wrangle_runs column(s) {sorted(unknown)}")
    values = {k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v)
              for k, v in fields.items()}
    sets = ", ".join(f"{tables.quote_ident(k)} = ?" for k in values)
    with tables.transaction(con):
        con.execute(f"UPDATE {tables.quote_ident(RUNS_TABLE)} SET {sets} WHERE run_id = ?",
                    [*values.values(), run_id])
