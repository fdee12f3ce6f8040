"""The ``load-benchmarks`` flow: put the benchmark datasets of ``data/`` into DuckDB tables.

Table names, per dataset slug (``Fodors-Zagats`` -> ``fodors_zagats``) and split:

* entity matching, Magellan layout: ``<slug>_table_a``, ``<slug>_table_b``,
  ``<slug>_<split>_pairs`` (``ltable_id, rtable_id, label``) and ``<slug>_<demo split>_pairs``
  (the few-shot pool: train, or valid when ``split`` is train);
  left_/right_ layout (iTunes-Amazon): the two pairs tables only.
* imputation: ``<slug>_<split>`` (rows as published, with a ``row_id``),
  ``<slug>_<split>_masked`` (the same rows with the target NULL: what the flow imputes),
  ``<slug>_<demo split>`` (labelled rows for few-shot).
* error detection: ``<slug>_table`` (the dirty table with ``row_id``), ``<slug>_<split>_cells``
  (``row_id, col_name``: the cells to check), ``<slug>_<split>_labels`` (``row_id, col_name,
  is_clean|is_error``: truth for those cells plus the few-shot pool's cells).

``python -m flows.load_benchmarks [--database PATH] [DATASET ...]`` runs it from a shell.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
import prefect
from prefect.cache_policies import NO_CACHE

import wrangling_tasks as wt
from wrangling_tasks import tables


def slug(name: str) -> str:
    """Dataset name -> table-name prefix: ``"Fodors-Zagats"`` -> ``"fodors_zagats"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def demo_split(split: str) -> str:
    """Where load_benchmark takes demonstrations from for ``split``."""
    return "valid" if split == "train" else "train"


def benchmark_tables(dataset: str, split: str = "test", data_dir: str | None = None) -> dict[str, pd.DataFrame]:
    """The DuckDB tables of one benchmark dataset split (see the module doc for names)."""
    info = wt.DATA.get(dataset)
    if info is None:
        raise wt.base.InputError(f"unknown dataset {dataset!r}; known: {sorted(wt.DATA)}")
    inputs = wt.load_benchmark(info.task, dataset, split, data_dir=data_dir)
    s, d = slug(dataset), demo_split(split)
    if isinstance(inputs, wt.MatchingInputs):
        out = {}
        if inputs.left is not None:
            out[f"{s}_table_a"] = inputs.left
            out[f"{s}_table_b"] = inputs.right
        out[f"{s}_{split}_pairs"] = inputs.pairs
        if inputs.demos is not None:
            out[f"{s}_{d}_pairs"] = inputs.demos
        return out
    if isinstance(inputs, wt.ImputationInputs):
        target = inputs.target
        table = _with_row_id(inputs.table)
        published = table.assign(**{target: list(inputs.labels)})
        out = {f"{s}_{split}": published, f"{s}_{split}_masked": table}
        if inputs.demos is not None:
            out[f"{s}_{d}"] = _with_row_id(inputs.demos)
        return out
    table = inputs.table
    if "row_id" not in table.columns:
        table = table.rename_axis("row_id").reset_index() if table.index.name == "row_id" \
            else _with_row_id(table)
    out = {f"{s}_table": table}
    if inputs.cells is not None:
        out[f"{s}_{split}_cells"] = inputs.cells.reset_index(drop=True)
    if inputs.labels is not None:
        out[f"{s}_{split}_labels"] = inputs.labels.reset_index(drop=True)
    return out


def _with_row_id(frame: pd.DataFrame) -> pd.DataFrame:
    if "row_id" in frame.columns:
        return frame.reset_index(drop=True)
    out = frame.reset_index(drop=True)
    out.insert(0, "row_id", range(len(out)))
    return out


@prefect.task(name="read-benchmark", cache_policy=NO_CACHE)
def read_benchmark(dataset: str, split: str, data_dir: str | None) -> dict[str, Any]:
    return benchmark_tables(dataset, split, data_dir)


@prefect.task(name="write-tables", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_tables(database: str, frames: dict[str, Any]) -> dict[str, int]:
    """Replace the tables in one transaction (idempotent)."""
    with tables.connect(database, create=True) as con:
        return tables.replace_tables(con, frames)


@flow(name="load-benchmarks")
def load_benchmarks(
    datasets: list[str] | None = None,
    split: str = "test",
    database: str = "data/wrangle.duckdb",
    data_dir: str | None = None,
) -> dict[str, int]:
    """Load ``datasets`` (default: all in wrangling_tasks.DATA) into ``database``; returns
    rows per table written."""
    log = get_run_logger()
    names = list(datasets) if datasets else list(wt.DATA)
    unknown = [n for n in names if n not in wt.DATA]
    if unknown:
        raise wt.base.InputError(f"unknown dataset(s) {unknown}; known: {sorted(wt.DATA)}")
    frames: dict[str, Any] = {}
    for name in names:  # read everything first: a bad file fails before any write
        frames.update(read_benchmark(name, split, data_dir))
    counts = write_tables(database, frames)
    for table_name, rows in counts.items():
        log.info("%s: %d rows", table_name, rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", help="dataset names (default: all)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--database", default="data/wrangle.duckdb")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    counts = load_benchmarks(datasets=args.datasets or None, split=args.split,
                             database=args.database, data_dir=args.data_dir)
    print(f"{len(counts)} tables written to {args.database}")


if __name__ == "__main__":
    main()
