"""Table scale-out as plain functions (no Prefect): which rows a partition owns, the Parquet files
a partition writes, and the merge that loads them into DuckDB in one transaction.

DuckDB lets one process write a database file at a time, so partitions never write it: each
writes its chunks as Parquet files, typed exactly like the DuckDB output tables, under

    <output_dir>/<run_key>/part-<i>-of-<n>/<stem>.results.parquet   (and .quarantine.parquet)

and the parent merges every file of the run with ``INSERT ... ON CONFLICT DO NOTHING`` on the
results' primary key ``(run_key, row_key, occurrence)``: a row is written once, however many
times a partition or the merge is retried. When the files hold an item more than once (a file
left by an earlier attempt, answered under a prompt that has since changed), the newest answer
wins, and it replaces a stored answer given under another prompt. Files are written under a
temporary name and renamed, so a killed partition leaves whole files only; they are deleted after
the merge commits.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from flows import store
from wrangling_tasks import tables

KINDS = {"results": None, "quarantine": store.QUARANTINE_TABLE}   # file kind -> table (results: per task)


def partition_of(row_key: str, occurrence: int, partitions: int) -> int:
    """The partition that owns a row: a stable hash of its identity (unchanged when rows are added)."""
    return zlib.crc32(f"{int(occurrence)}\x1f{row_key}".encode("utf-8")) % partitions


def share(items: pd.DataFrame, partition: int, partitions: int) -> pd.DataFrame:
    """The items (``row_key``, ``occurrence`` columns) that ``partition`` of ``partitions`` owns."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
    owner = [partition_of(r, o, partitions) for r, o in zip(items["row_key"], items["occurrence"])]
    return items[[p == partition for p in owner]]


def run_dir(output_dir: str | os.PathLike, run_key: str) -> Path:
    return Path(output_dir) / run_key


def partition_dir(output_dir: str | os.PathLike, run_key: str, partition: int, partitions: int) -> Path:
    return run_dir(output_dir, run_key) / f"part-{partition}-of-{partitions}"


def files(output_dir: str | os.PathLike, run_key: str, kind: str) -> list[Path]:
    """Every finished ``kind`` file of the run, from any partitioning of it."""
    return sorted(run_dir(output_dir, run_key).glob(f"part-*/*.{kind}.parquet"))


def write_chunk(directory: Path, task: str, results: pd.DataFrame, quarantine: pd.DataFrame) -> list[Path]:
    """One chunk of a partition's output as Parquet files typed like the DuckDB tables."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = uuid.uuid4().hex[:12]
    written = []
    with tables.connect(":memory:") as con:
        store.ensure_schema(con)
        store.write_chunk(con, task, results, quarantine)
        for kind, frame in (("results", results), ("quarantine", quarantine)):
            if frame.empty:
                continue
            table = KINDS[kind] or store.RESULT_TABLES[task]
            final = directory / f"{stem}.{kind}.parquet"
            tmp = directory / f".{stem}.{kind}.parquet.tmp"
            con.execute(f"COPY {tables.quote_ident(table)} TO '{_sql_path(tmp)}' (FORMAT parquet)")
            os.replace(tmp, final)
            written.append(final)
    return written


def written_keys(output_dir: str | os.PathLike, run_key: str) -> pd.DataFrame:
    """``row_key, occurrence, prompt_hash`` of every row in the run's results files (answered, not yet
    merged)."""
    paths = files(output_dir, run_key, "results")
    if not paths:
        return pd.DataFrame({"row_key": pd.Series([], dtype=object), "occurrence": pd.Series([], dtype="int64"),
                             "prompt_hash": pd.Series([], dtype=object)})
    with duckdb.connect(":memory:") as con:
        return con.execute("SELECT row_key, occurrence, prompt_hash FROM read_parquet(?) WHERE run_key = ?",
                           [[str(p) for p in paths], run_key]).df()


def merge(database: str, task: str, output_dir: str | os.PathLike, run_key: str) -> dict[str, int]:
    """Load every Parquet file of the run into the DuckDB output tables in one transaction (rows
    already there under the same prompt are skipped; the newest answer of an item wins), then delete
    the files. Returns rows inserted per kind, and the stored answers replaced."""
    found = {kind: files(output_dir, run_key, kind) for kind in KINDS}
    out = {"results": 0, "quarantine": 0, "replaced": 0}
    if found["results"]:
        with tables.connect(database) as con:
            store.ensure_schema(con)
            with tables.transaction(con):
                out |= _merge(con, task, found)
    for paths in found.values():
        for p in paths:
            p.unlink(missing_ok=True)
    out["files"] = sum(len(p) for p in found.values())
    return out


def _merge(con: duckdb.DuckDBPyConnection, task: str, found: dict[str, list[Path]]) -> dict[str, int]:
    quarantine = store.QUARANTINE_TABLE
    chosen = tables.quote_ident("__flexwrangle_merged")
    con.execute(f"CREATE TEMP TABLE {chosen} AS SELECT * FROM read_parquet(?, union_by_name = true) QUALIFY "
                "row_number() OVER (PARTITION BY run_key, row_key, occurrence ORDER BY created_at DESC) = 1",
                [[str(p) for p in found["results"]]])
    try:
        inserted, replaced = store.replace_and_insert(con, task, chosen, newer_only=True)
        q = 0
        if found["quarantine"]:      # the reasons of the answers chosen (same item, same attempt)
            cols = ", ".join(f"q.{tables.quote_ident(c)}" for c in tables.table_columns(con, quarantine))
            rows = con.execute(
                f"INSERT INTO {tables.quote_ident(quarantine)} SELECT {cols} "
                "FROM read_parquet(?, union_by_name = true) q "
                f"JOIN {chosen} c ON q.run_key = c.run_key AND q.row_key = c.row_key AND q.occurrence = c.occurrence "
                "AND q.run_id IS NOT DISTINCT FROM c.run_id ON CONFLICT DO NOTHING",
                [[str(p) for p in found["quarantine"]]]).fetchall()
            q = int(rows[0][0]) if rows else 0
    finally:
        con.execute(f"DROP TABLE {chosen}")
    return {"results": inserted, "quarantine": q, "replaced": replaced}



def write_manifest(directory: Path, summary: dict[str, Any]) -> Path:
    """A partition attempt's summary (rows, seconds, tokens, host, pids) as JSON beside its files."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"manifest-{uuid.uuid4().hex[:12]}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_manifests(output_dir: str | os.PathLike, run_key: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run_dir(output_dir, run_key).glob("part-*/manifest-*.json"))]


def clear_manifests(output_dir: str | os.PathLike, run_key: str) -> None:
    for p in run_dir(output_dir, run_key).glob("part-*/manifest-*.json"):
        p.unlink(missing_ok=True)


def _sql_path(path: Path) -> str:
    """A file path as a SQL string literal body (COPY takes no bound parameters)."""
    return str(path).replace("'", "''")
