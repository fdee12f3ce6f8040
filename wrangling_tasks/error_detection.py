"""Error detection: is this cell wrong? -> Yes (error) / No, one item per (row_id, col_name).

Prompt (paper, Hospital): ``Is there a x spelling error in {col}: {value}?``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from wrangling_tasks import scoring
from wrangling_tasks.base import (
    PREDICTION_COLUMNS,
    Expectations,
    InputError,
    TaskSpec,
    require_columns,
    require_rows,
    to_bool,
)
from wrangling_tasks.serialize import attribute_columns, format_value, serialize_cell

NAME = "error-detection"
key_columns: tuple[str, ...] = ("row_id", "col_name")
allowed_answers: tuple[Any, ...] = (True, False)  # True = the cell has an error
choices: tuple[str, ...] = ("Yes", "No")
default_max_new_tokens = 3
DEFAULT_QUESTION = "Is there a x spelling error in {cell}?"


@dataclass
class DetectionInputs:
    """A table to check, cell by cell.

    ``cells`` (``row_id, col_name``) chooses the cells to check (default: every row
    x ``columns``). Truth for evaluation and demonstrations comes from ``labels``
    (``row_id, col_name`` and ``is_error`` or ``is_clean``) or a ``clean`` twin
    (same rows in the same order; columns matched by name, else by position).
    Labelled cells that are not checked form the demonstration pool.
    """

    table: pd.DataFrame  # row ids: a row_id column, else the index
    columns: Sequence[str] | None = None  # None: spec.columns, else every attribute column
    cells: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None
    clean: pd.DataFrame | None = None
    spec: TaskSpec | None = None


def default_spec() -> TaskSpec:
    """Task defaults: the paper's spelling-error question, 3 new tokens."""
    return TaskSpec(question=DEFAULT_QUESTION, max_new_tokens=default_max_new_tokens)


def coerce_inputs(inputs: Any, spec: TaskSpec) -> DetectionInputs:
    """Accept :class:`DetectionInputs` or a DataFrame (all its attribute cells are checked)."""
    if isinstance(inputs, pd.DataFrame):
        return DetectionInputs(table=inputs)
    if isinstance(inputs, DetectionInputs):
        return inputs
    raise InputError(f"error detection needs DetectionInputs or a DataFrame, got {type(inputs).__name__}.")


def keys_for(inputs: DetectionInputs) -> tuple[str, ...]:
    """Key columns of the predictions: ``row_id, col_name``."""
    return key_columns


def checked_columns(inputs: DetectionInputs, spec: TaskSpec) -> list[str]:
    """The columns whose cells are checked."""
    table = _indexed(inputs.table)
    cols = list(inputs.columns or spec.columns or attribute_columns(table.columns, spec.id_columns, spec.drop_columns))
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise InputError(f"columns to check {missing} are not in the table (it has {list(table.columns)}).")
    return cols


def make_items(inputs: DetectionInputs, spec: TaskSpec) -> pd.DataFrame:
    """One item per checked cell: ``row_id``, ``col_name``, ``body``, ``question``, ``label``."""
    table = _indexed(inputs.table)
    require_rows(table, "the table to check")
    return _render(_item_cells(inputs, spec, table), table, spec, _truth(inputs, table))


def demo_pool(inputs: DetectionInputs, spec: TaskSpec) -> pd.DataFrame:
    """Labelled cells that are not checked (a clean twin labels every cell)."""
    table = _indexed(inputs.table)
    truth = _truth(inputs, table)
    items = _item_cells(inputs, spec, table)
    taken = set(zip(items["row_id"].astype(str), items["col_name"]))
    free = [k for k in truth if k not in taken]
    if not free:
        return pd.DataFrame({"body": [], "question": [], "label": pd.array([], dtype="boolean")})
    by_str = {str(i): i for i in table.index}
    cells = pd.DataFrame([(by_str[r], c) for r, c in free if r in by_str], columns=list(key_columns))
    return _render(cells, table, spec, truth)


def format_answer(label: Any) -> str:
    """``True`` (error) -> "Yes", ``False`` -> "No"."""
    return "Yes" if to_bool(label) else "No"


def parse(text: str | None) -> bool | None:
    """Model text -> True (error) / False / None (unparseable)."""
    return scoring.parse_yes_no(text)


def score(answers: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Precision, recall, F1 of the error class, accuracy, confusion counts."""
    return scoring.binary_metrics(answers, labels)


def expectations(spec: TaskSpec | None = None) -> Expectations:
    """Checks a predictions table must pass."""
    return Expectations(key_columns, allowed_answers, PREDICTION_COLUMNS)


def cell_labels_from_clean(dirty: pd.DataFrame, clean: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``row_id, col_name, is_error`` for every cell of ``columns``: dirty text != clean text."""
    dirty = _indexed(dirty)
    clean = _aligned_clean(dirty, clean)
    rows = []
    for col in columns:
        for rid, d, c in zip(dirty.index, dirty[col], clean[col]):
            rows.append((rid, col, format_value(d) != format_value(c)))
    return pd.DataFrame(rows, columns=["row_id", "col_name", "is_error"])


# --- inputs from database tables -------------------------------------------------------------

TABLES: tuple[str, ...] = ("table", "cells_table", "labels_table", "clean_table")
OPTIONS: tuple[str, ...] = ("columns",)
REQUIRED_OPTIONS: Mapping[str, str] = {}
RESULT_KEY_COLUMNS: tuple[str, ...] = key_columns
RESULT_SPEC_FIELDS: tuple[str, ...] = ()


def required_columns(table: str, spec: TaskSpec, columns: Sequence[str] | None = None) -> list[str]:
    """Columns the table named by parameter ``table`` must have: the cell keys, and the ``columns``
    the caller asked to check."""
    if table in ("cells_table", "labels_table"):
        return list(key_columns)
    return list(columns) if table == "table" and columns else []


def inputs_from_tables(frames: Mapping[str, pd.DataFrame], spec: TaskSpec) -> DetectionInputs:
    """The inputs from the tables read, keyed by the parameter that named each one."""
    return DetectionInputs(table=frames["table"], columns=spec.columns, cells=frames.get("cells_table"),
                           labels=frames.get("labels_table"), clean=frames.get("clean_table"), spec=spec)


def keyed_by_content(inputs: DetectionInputs) -> bool:
    """Whether the table has no ``row_id`` column: its rows have positions only."""
    return "row_id" not in inputs.table.columns


# --- helpers ---------------------------------------------------------------------------------


def _item_cells(inputs: DetectionInputs, spec: TaskSpec, table: pd.DataFrame) -> pd.DataFrame:
    if inputs.cells is None:
        cols = checked_columns(inputs, spec)
        return pd.DataFrame([(r, c) for r in table.index for c in cols], columns=list(key_columns))
    require_columns(inputs.cells, key_columns, "the cells table")
    require_rows(inputs.cells, "the cells table")
    return inputs.cells[list(key_columns)].reset_index(drop=True)


def _indexed(table: pd.DataFrame) -> pd.DataFrame:
    if "row_id" in table.columns:
        table = table.set_index("row_id", drop=True)
    if not table.index.is_unique:
        raise InputError("row ids must be unique: give the table a unique row_id column or index.")
    return table


def _aligned_clean(dirty: pd.DataFrame, clean: pd.DataFrame) -> pd.DataFrame:
    clean = clean.drop(columns=["row_id"]) if "row_id" in clean.columns else clean
    if len(clean) != len(dirty):
        raise InputError(f"the clean twin has {len(clean)} rows, the table {len(dirty)}: they must hold the "
                         "same rows in the same order.")
    if not set(dirty.columns) <= set(clean.columns):
        if len(clean.columns) != len(dirty.columns):
            raise InputError("the clean twin's columns match the table's neither by name nor by position "
                             f"({list(clean.columns)} vs {list(dirty.columns)}).")
        clean = clean.set_axis(list(dirty.columns), axis=1)
    return clean.set_axis(dirty.index, axis=0)


def _truth(inputs: DetectionInputs, table: pd.DataFrame) -> dict[tuple[str, str], bool]:
    truth: dict[tuple[str, str], bool] = {}
    if inputs.clean is not None:
        labels = cell_labels_from_clean(table, inputs.clean, list(table.columns))
        truth.update(zip(zip(labels["row_id"].astype(str), labels["col_name"]), labels["is_error"]))
    if inputs.labels is not None:
        lab = inputs.labels
        require_columns(lab, key_columns, "the cell labels")
        if "is_error" in lab.columns:
            values = [to_bool(v) for v in lab["is_error"]]
        elif "is_clean" in lab.columns:
            values = [None if (b := to_bool(v)) is None else not b for v in lab["is_clean"]]
        else:
            raise InputError("cell labels need an is_error (1 = wrong cell) or is_clean (1 = correct) column.")
        truth.update((k, v) for k, v in zip(zip(lab["row_id"].astype(str), lab["col_name"]), values) if v is not None)
    return truth


def _render(cells: pd.DataFrame, table: pd.DataFrame, spec: TaskSpec, truth: dict) -> pd.DataFrame:
    template = spec.question or DEFAULT_QUESTION
    if "{cell}" not in template:
        raise InputError(f"the error-detection question must contain {{cell}}, got {template!r}.")
    before, after = template.split("{cell}", 1)
    unknown = sorted(set(cells["col_name"]) - set(table.columns))
    if unknown:
        raise InputError(f"cells name column(s) {unknown} that the table does not have.")
    by_str = {str(i): i for i in table.index}
    missing = sorted({str(r) for r in cells["row_id"]} - by_str.keys())
    if missing:
        raise InputError(f"{len(missing)} row_id(s) of the cells are not in the table, e.g. {missing[:5]}.")
    columns = {c: table[c].to_dict() for c in set(cells["col_name"])}
    bodies, labels = [], []
    for rid, col in zip(cells["row_id"], cells["col_name"]):
        value = columns[col][by_str[str(rid)]]
        bodies.append(before + serialize_cell(col, value, spec.rename))
        labels.append(truth.get((str(rid), col)))
    out = cells.copy()
    out["body"] = bodies
    out["question"] = after
    out["label"] = pd.array(labels, dtype="boolean")
    return out
