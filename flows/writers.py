"""Where a wrangle run keeps its answers (plain Python, no Prefect): :func:`flows.runner.run_wrangle`
answers the rows and hands each checked chunk to a writer.

* :class:`DuckDBWriter`: the output tables of the database (:mod:`flows.store`). One live attempt per
  run (:mod:`flows.runlock`), a run record in ``wrangle_runs``, resume by ``prompt_hash``, stale rows,
  quarantine, and a whole-run check at the end.
* :class:`ParquetWriter`: Parquet files typed like those tables, under
  ``<output_dir>/<run_key>/part-<i>-of-<n>/`` (:mod:`flows.partitions`), for a process that must
  not write the database (a partition of a scaled-out run; the parent merges the files). It resumes
  from the database's rows and the files already there, and records nothing in the database.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from flows import partitions as parts
from flows import llms, runlock, steps, store
from wrangling_tasks import tables

__all__ = ["Writer", "Tally", "DuckDBWriter", "ParquetWriter"]


@dataclass
class Tally:
    """What one attempt did: its items (this writer's share), skipped, written, inference time, tokens."""

    items: int
    skipped: int
    replaced: int
    stale: int
    written: int = 0
    infer_s: float = 0.0
    tokens: int | None = 0       # None once a chunk's model did not report its tokens

    def add(self, inserted: int, inference: steps.Inference) -> None:
        self.written += inserted
        self.infer_s += inference.seconds
        self.tokens = None if inference.tokens is None or self.tokens is None else self.tokens + inference.tokens


class Writer(Protocol):
    """What :func:`flows.runner.run_wrangle` needs of the place it writes to."""

    # Whether the model loads before the run starts, even when nothing is left to do (the run record
    # names the engine's placed policy). It always does when the policy search chooses the precision:
    # the run key names the one it chose.
    loads_model_first: bool

    def hold(self, run_key: str, holder: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Exclude other live attempts of the run for the ``with`` block."""

    def budget_name(self, run_id: str) -> str:
        """The name of the engine's offload folder for this attempt."""

    def share(self, items: pd.DataFrame) -> pd.DataFrame:
        """The items this writer answers (all of them, or a partition's)."""

    def start(self, ctx: steps.RunContext, record: dict[str, Any], items: pd.DataFrame, keys: Sequence[str],
              present: pd.DataFrame) -> steps.Started:
        """Record the attempt, bring stored rows in line with the input; what is already answered."""

    def write(self, ctx: steps.RunContext, results: pd.DataFrame, quarantine: pd.DataFrame) -> int:
        """Write one chunk (whole or not at all; safe to retry); the rows written."""

    def finish(self, ctx: steps.RunContext, items: pd.DataFrame, keys: Sequence[str]) -> dict[str, Any]:
        """The run's output checked: ``valid_rows``, ``quarantined_rows``, ``metrics``, ``table_failures``,
        ``written_rows``."""

    def complete(self, ctx: steps.RunContext, result: dict[str, Any], tally: Tally,
                 engine: dict[str, Any]) -> dict[str, Any]:
        """Record a finished attempt; what the run returns."""

    def fail(self, ctx: steps.RunContext, exc: BaseException, started: float, **fields: Any) -> None:
        """Record a failed or cancelled attempt (best effort: the original error matters more)."""


class DuckDBWriter:
    """The database's output tables, written by this process alone while it holds the run's lock."""

    loads_model_first = True

    def __init__(self, database: str, log: Any = None) -> None:
        self.database = database
        self.log = log

    def hold(self, run_key: str, holder: dict[str, Any]) -> contextlib.AbstractContextManager:
        return runlock.hold(self.database, run_key, holder)

    def budget_name(self, run_id: str) -> str:
        return run_id

    def share(self, items: pd.DataFrame) -> pd.DataFrame:
        return items

    def start(self, ctx: steps.RunContext, record: dict[str, Any], items: pd.DataFrame, keys: Sequence[str],
              present: pd.DataFrame) -> steps.Started:
        return steps.start(self.database, record, ctx, items, keys, present)

    def write(self, ctx: steps.RunContext, results: pd.DataFrame, quarantine: pd.DataFrame) -> int:
        return steps.load(self.database, ctx, results, quarantine)

    def finish(self, ctx: steps.RunContext, items: pd.DataFrame, keys: Sequence[str]) -> dict[str, Any]:
        return steps.check_whole_run(self.database, ctx, items, keys)

    def complete(self, ctx: steps.RunContext, result: dict[str, Any], tally: Tally | None = None,
                 engine: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the attempt ``completed`` with its counts, metrics and the engine's measured peaks."""
        with tables.connect(self.database) as con:
            store.finish_run(con, ctx.run_id, finished_at=store.utcnow(),
                             **{k: v for k, v in result.items() if k not in ("run_id", "run_key", "task")},
                             **llms.measured(engine or {}))
        return result | (engine or {})

    def fail(self, ctx: steps.RunContext, exc: BaseException, started: float, **fields: Any) -> None:
        """``fields``: more columns of the record; ``written_rows`` defaults to the rows this attempt wrote."""
        status = "failed" if isinstance(exc, Exception) else "cancelled"
        try:
            with tables.connect(self.database, lock_timeout_s=5) as con:
                if "written_rows" not in fields:
                    fields["written_rows"] = store.written_by(con, ctx.task, ctx.run_key, ctx.run_id)
                store.finish_run(con, ctx.run_id, status=status, error=f"{type(exc).__name__}: {exc}",
                                 finished_at=store.utcnow(), seconds=time.perf_counter() - started, **fields)
        except Exception as record_exc:  # the original error matters more; keep it
            if self.log is not None:
                self.log.warning("could not record the failure of run %s: %s", ctx.run_id, record_exc)


class ParquetWriter:
    """Parquet files under ``<output_dir>/<run_key>/part-<partition>-of-<partitions>/``, one pair of files
    (results, quarantine) per chunk, each written whole under a temporary name and renamed.

    It answers the items of its partition (all of them with the defaults) that neither the database
    nor any file of the run holds under the same prompt. It takes no lock and writes no record: a
    partition belongs to its parent's attempt, which holds the lock and merges the files.
    ``flow_run_id``: the process's own run (for its manifest).
    """

    loads_model_first = False      # nothing left to do: no model to load

    def __init__(self, database: str, output_dir: str | os.PathLike, partition: int = 0, partitions: int = 1,
                 flow_run_id: str | None = None) -> None:
        if not 0 <= partition < partitions:
            raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
        self.database, self.output_dir = database, output_dir
        self.partition, self.partitions, self.flow_run_id = partition, partitions, flow_run_id
        self.directory: Path | None = None
        self.rows = self.quarantined = 0

    def hold(self, run_key: str, holder: dict[str, Any]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def budget_name(self, run_id: str) -> str:
        return f"{run_id}-partition-{self.partition}"

    def share(self, items: pd.DataFrame) -> pd.DataFrame:
        return parts.share(items, self.partition, self.partitions)

    def start(self, ctx: steps.RunContext, record: dict[str, Any], items: pd.DataFrame, keys: Sequence[str],
              present: pd.DataFrame) -> steps.Started:
        self.directory = parts.partition_dir(self.output_dir, ctx.run_key, self.partition, self.partitions)
        with tables.connect(self.database, read_only=True) as con:
            stored = store.answered_rows(con, ctx.task, ctx.run_key)
        in_files = parts.written_keys(self.output_dir, ctx.run_key)
        return steps.Started(pd.concat([stored, in_files], ignore_index=True), 0)

    def write(self, ctx: steps.RunContext, results: pd.DataFrame, quarantine: pd.DataFrame) -> int:
        assert self.directory is not None, "start() names the directory"
        parts.write_chunk(self.directory, ctx.task, results, quarantine)
        self.rows += len(results)
        self.quarantined += quarantine[["row_key", "occurrence"]].drop_duplicates().shape[0]
        return len(results)

    def finish(self, ctx: steps.RunContext, items: pd.DataFrame, keys: Sequence[str]) -> dict[str, Any]:
        """Counts of this attempt's files; the whole-run check and the metrics come when they are merged."""
        return {"written_rows": self.rows, "valid_rows": self.rows - self.quarantined,
                "quarantined_rows": self.quarantined, "metrics": None, "table_failures": []}

    def complete(self, ctx: steps.RunContext, result: dict[str, Any], tally: Tally,
                 engine: dict[str, Any]) -> dict[str, Any]:
        """The attempt's summary, also written beside its files as a manifest for the parent."""
        assert self.directory is not None, "start() names the directory"
        summary = {"partition": self.partition, "partitions": self.partitions, "written": tally.written,
                   "infer_s": tally.infer_s, "tokens": tally.tokens, "host": socket.gethostname(),
                   "pid": os.getpid(), "ppid": os.getppid(), "flow_run_id": self.flow_run_id,
                   "items": tally.items, "skipped": tally.skipped, "seconds": result["seconds"], "engine": engine}
        parts.write_manifest(self.directory, summary)
        return summary

    def fail(self, ctx: steps.RunContext, exc: BaseException, started: float, **fields: Any) -> None:
        """Nothing to record: the files written so far are whole, and the parent records the attempt."""
