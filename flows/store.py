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
are skipped (resume); ``run_id`` names one attempt (the Prefect flow-run id).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import duckdb
import pandas as pd

from wrangling_tasks import tables

RESULT_TABLES: dict[str, str] = {
    "entity-matching": "wrangle_entity_matching",
    "imputation": "wrangle_imputation",
    "error-detection": "wrangle_error_detection",
}
RUNS_TABLE = "wrangle_runs"
QUARANTINE_TABLE = "wrangle_quarantine"
SCORES_VIEW = "wrangle_scores"

# Key columns each results table can hold (stored as text: ids of any type fit, and keys of
# different input layouts share one table; unused ones are NULL).
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "entity-matching": ("ltable_id", "rtable_id", "pair_id"),
    "imputation": ("row_id",),
    "error-detection": ("row_id", "col_name"),
}
ANSWER_TYPES: dict[str, str] = {
    "entity-matching": "BOOLEAN",   # True = same entity
    "imputation": "VARCHAR",        # the filled-in value
    "error-detection": "BOOLEAN",   # True = the cell is an error
}
EXTRA_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "entity-matching": (),
    "imputation": (("target", "VARCHAR"),),
    "error-detection": (),
}

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
)

RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR PRIMARY KEY"),
    ("run_key", "VARCHAR NOT NULL"),
    ("flow_run_name", "VARCHAR"),
    ("task", "VARCHAR NOT NULL"),
    ("parameters", "VARCHAR"),       # JSON text
    ("model", "VARCHAR"),
    ("policy", "VARCHAR"),           # JSON text: the engine's policy as placed (every field), else the parameter
    ("status", "VARCHAR NOT NULL"),  # running | completed | failed | interrupted
    ("started_at", "TIMESTAMP"),
    ("finished_at", "TIMESTAMP"),
    ("seconds", "DOUBLE"),
    ("input_rows", "BIGINT"),        # items this run covered (after limit)
    ("skipped_rows", "BIGINT"),      # already answered by an earlier attempt (resume)
    ("written_rows", "BIGINT"),      # answered by this attempt
    ("valid_rows", "BIGINT"),
    ("quarantined_rows", "BIGINT"),
    ("rows_per_s", "DOUBLE"),        # written rows / inference seconds
    ("tokens_per_s", "DOUBLE"),      # generated tokens / s, when the model reports it
    ("metrics", "VARCHAR"),          # JSON text: the task's scores over the run's items
    ("error", "VARCHAR"),
    ("budget", "VARCHAR"),           # JSON text: the engine's caps per tier and its offload folder
    ("peak_bytes", "VARCHAR"),       # JSON text: the engine's measured peak bytes per tier
    ("peak_rss_bytes", "BIGINT"),    # the process's peak resident memory
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


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the output tables and the scores view if missing (idempotent, one transaction)."""
    with tables.transaction(con):
        for task, name in RESULT_TABLES.items():
            _create(con, name, result_columns(task), ("run_key", "row_key", "occurrence"))
        _create(con, QUARANTINE_TABLE, QUARANTINE_COLUMNS,
                ("run_key", "row_key", "occurrence", "reason"))
        _create(con, RUNS_TABLE, RUN_COLUMNS)
        have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = ?", [RUNS_TABLE]).fetchall()}
        for column, kind in RUN_COLUMNS:      # a database written by an older version gains new columns
            if column not in have:
                con.execute(f"ALTER TABLE {tables.quote_ident(RUNS_TABLE)} ADD COLUMN "
                            f"{tables.quote_ident(column)} {kind}")
        con.execute(SCORES_SQL)


# Scores in SQL, with the same rules as wrangling_tasks.scoring: only labelled rows count; an
# unanswered row (answer NULL) counts as wrong; F1 is the true harmonic mean (0 when P+R = 0);
# imputation compares case- and whitespace-normalised text.
SCORES_SQL = """
CREATE OR REPLACE VIEW wrangle_scores AS
WITH yes_no AS (
    SELECT 'entity-matching' AS task, run_key, model, answer, label FROM wrangle_entity_matching
    UNION ALL
    SELECT 'error-detection', run_key, model, answer, label FROM wrangle_error_detection
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
), imputation AS (
    SELECT 'imputation' AS task, run_key, any_value(model) AS model, count(*) AS rows,
           count(label) AS labelled,
           count(*) FILTER (WHERE label IS NOT NULL AND answer IS NULL) AS unanswered,
           count(*) FILTER (WHERE lower(regexp_replace(trim(answer), '\\s+', ' ', 'g'))
                                = lower(regexp_replace(trim(label), '\\s+', ' ', 'g'))) AS correct
    FROM wrangle_imputation GROUP BY run_key
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
FROM imputation
"""


def answered_rows(con: duckdb.DuckDBPyConnection, task: str, run_key: str) -> pd.DataFrame:
    """``row_key, occurrence`` of the rows a run (``run_key``) has already written."""
    name = RESULT_TABLES[task]
    if not tables.table_exists(con, name):
        return pd.DataFrame({"row_key": pd.Series([], dtype=object),
                             "occurrence": pd.Series([], dtype="int64")})
    return con.execute(
        f"SELECT row_key, occurrence FROM {tables.quote_ident(name)} WHERE run_key = ?",
        [run_key],
    ).df()


def read_results(con: duckdb.DuckDBPyConnection, task: str, run_key: str) -> pd.DataFrame:
    """Every results row of ``run_key``."""
    return con.execute(
        f"SELECT * FROM {tables.quote_ident(RESULT_TABLES[task])} WHERE run_key = ?", [run_key]
    ).df()


def write_chunk(con: duckdb.DuckDBPyConnection, task: str, results: pd.DataFrame,
                quarantine: pd.DataFrame) -> None:
    """Write one chunk's results and its quarantined rows in one transaction.

    Rows already present (same primary key) are left alone, so writing a chunk twice is a
    no-op: the write is idempotent and safe to retry.
    """
    with tables.transaction(con):
        tables.insert_frame(con, RESULT_TABLES[task], results, ignore_conflicts=True)
        tables.insert_frame(con, QUARANTINE_TABLE, quarantine, ignore_conflicts=True)


def quarantine_written(con: duckdb.DuckDBPyConnection, task: str, run_key: str,
                       quarantine: pd.DataFrame) -> None:
    """Quarantine rows that are already written (found by a whole-run check): one transaction."""
    if quarantine.empty:
        return
    with tables.transaction(con):
        tables.insert_frame(con, QUARANTINE_TABLE, quarantine, ignore_conflicts=True)
        name = tables.quote_ident(RESULT_TABLES[task])
        con.executemany(
            f"UPDATE {name} SET valid = false WHERE run_key = ? AND row_key = ? AND occurrence = ?",
            [[run_key, r, int(o)] for r, o in zip(quarantine["row_key"], quarantine["occurrence"])],
        )


def count_quarantined(con: duckdb.DuckDBPyConnection, run_key: str,
                      rows: pd.DataFrame | None = None) -> int:
    """Distinct quarantined rows of ``run_key`` (only those in ``rows`` when given)."""
    q = con.execute(
        f"SELECT DISTINCT row_key, occurrence FROM {tables.quote_ident(QUARANTINE_TABLE)} "
        "WHERE run_key = ?", [run_key]).df()
    if rows is not None:
        q = q.merge(rows[["row_key", "occurrence"]], on=["row_key", "occurrence"])
    return len(q)


def start_run(con: duckdb.DuckDBPyConnection, record: Mapping[str, Any]) -> None:
    """Insert the ``running`` row of an attempt; earlier ``running`` attempts of the same
    logical run (killed without a chance to record it) become ``interrupted``."""
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
