"""Imputation: fill a missing attribute. -> free text, scored by exact-match accuracy.

Prompt (paper): ``{row without the target}. What is the city?`` (Buy: ``Who is the manufacturer?``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from wrangling_tasks import scoring
from wrangling_tasks.base import (
    PREDICTION_COLUMNS,
    Expectations,
    InputError,
    TaskSpec,
    is_missing,
    require_columns,
    require_rows,
)
from wrangling_tasks.serialize import attribute_columns, format_value, one_line, serialize_row

NAME = "imputation"
key_columns: tuple[str, ...] = ("row_id",)
allowed_answers: tuple[Any, ...] | None = None  # free text
choices: tuple[str, ...] | None = None
default_max_new_tokens = 10
DEFAULT_QUESTION = "What is the {target}?"


@dataclass
class ImputationInputs:
    """A table whose ``target`` column has gaps to fill.

    Rows with a null ``target`` are the items; rows where it is known, plus
    ``demos``, are the demonstration pool. ``labels`` (aligned to ``table.index``,
    or a list as long as the table) hold the truth for evaluation.
    """

    table: pd.DataFrame
    target: str | None = None  # None: take spec.target
    labels: pd.Series | Sequence[Any] | None = None
    demos: pd.DataFrame | None = None  # extra labelled rows (same columns, target known)
    spec: TaskSpec | None = None


def default_spec() -> TaskSpec:
    """Task defaults: ``What is the {target}?``, 10 new tokens."""
    return TaskSpec(question=DEFAULT_QUESTION, max_new_tokens=default_max_new_tokens)


def coerce_inputs(inputs: Any, spec: TaskSpec) -> ImputationInputs:
    """Accept :class:`ImputationInputs` or a DataFrame (then ``spec.target`` names the column)."""
    if isinstance(inputs, pd.DataFrame):
        inputs = ImputationInputs(table=inputs)
    if not isinstance(inputs, ImputationInputs):
        raise InputError(f"imputation needs ImputationInputs or a DataFrame, got {type(inputs).__name__}.")
    if inputs.target is None and spec.target is None:
        raise InputError("imputation needs a target column: ImputationInputs(table, target='city') "
                         "or spec=TaskSpec(target='city').")
    return inputs


def keys_for(inputs: ImputationInputs) -> tuple[str, ...]:
    """Key columns of the predictions: ``row_id`` (a row_id column, else the table index)."""
    return key_columns


def _target(inputs: ImputationInputs, spec: TaskSpec) -> str:
    return inputs.target or spec.target  # type: ignore[return-value]


def _missing_mask(values: pd.Series) -> np.ndarray:
    return np.array([is_missing(v) or (isinstance(v, str) and not v.strip()) for v in values], dtype=bool)


def _row_ids(table: pd.DataFrame) -> pd.Series:
    if "row_id" in table.columns:
        return table["row_id"]
    return pd.Series(table.index, index=table.index)


def make_items(inputs: ImputationInputs, spec: TaskSpec) -> pd.DataFrame:
    """One item per row whose target is null: ``row_id``, ``body``, ``question``, ``label``."""
    table, target = inputs.table, _target(inputs, spec)
    require_rows(table, "the imputation table")
    require_columns(table, [target], "the imputation table", "Set the target to one of its columns.")
    mask = _missing_mask(table[target])
    if not mask.any():
        raise InputError(f"no row has a missing {target!r}: nothing to impute. To measure accuracy on "
                         f"known values, use wrangling_tasks.holdout(table, {target!r}).")
    rows = table[mask]
    out = _render(rows, target, spec)
    out.insert(0, "row_id", _row_ids(table)[mask].to_numpy())
    out["label"] = pd.array(_labels(inputs, mask), dtype="string")
    return out


def demo_pool(inputs: ImputationInputs, spec: TaskSpec) -> pd.DataFrame:
    """Rows with a known target (from the table and ``demos``): ``body``, ``question``, ``label``."""
    target = _target(inputs, spec)
    frames = [inputs.table[~_missing_mask(inputs.table[target])]]
    if inputs.demos is not None and len(inputs.demos):
        require_columns(inputs.demos, [target], "the demos table")
        frames.append(inputs.demos[~_missing_mask(inputs.demos[target])])
    pool = [_render(f, target, spec).assign(label=f[target].astype(str).str.strip().to_numpy()) for f in frames]
    return pd.concat(pool, ignore_index=True)


def format_answer(label: Any) -> str:
    """The demonstration answer: the value as text, on one line like every cell."""
    return one_line(format_value(label))


def parse(text: str | None) -> str | None:
    """Model text -> value (first line, trimmed of quotes and trailing punctuation) or None."""
    return scoring.parse_value(text)


def score(answers: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Accuracy (case- and whitespace-insensitive exact match), counts."""
    return scoring.accuracy_metrics(answers, labels)


def expectations(spec: TaskSpec | None = None) -> Expectations:
    """Checks a predictions table must pass (free-text answers)."""
    return Expectations(key_columns, allowed_answers, PREDICTION_COLUMNS)


def holdout(table: pd.DataFrame, target: str, frac: float = 0.1, seed: int = 0,
            spec: TaskSpec | None = None) -> ImputationInputs:
    """Hide ``target`` on a seeded ``frac`` of the known rows to measure accuracy on them."""
    require_columns(table, [target], "the table")
    known = np.flatnonzero(~_missing_mask(table[target]))
    if len(known) < 2:
        raise InputError(f"holdout needs at least 2 rows with a known {target!r}.")
    n = max(1, int(round(frac * len(known))))
    hide = np.random.default_rng(seed).choice(known, size=min(n, len(known) - 1), replace=False)
    labels = pd.Series([None] * len(table), index=table.index, dtype="object")
    labels.iloc[hide] = table[target].iloc[hide].to_numpy()
    masked = table.copy()
    masked[target] = masked[target].astype(object)
    masked.iloc[hide, masked.columns.get_loc(target)] = None
    return ImputationInputs(table=masked, target=target, labels=labels, spec=spec)


# --- inputs from database tables -------------------------------------------------------------

TABLES: tuple[str, ...] = ("table", "labels_table", "demos_table")
OPTIONS: tuple[str, ...] = ("target",)
REQUIRED_OPTIONS: Mapping[str, str] = {"target": "the column to fill"}
RESULT_KEY_COLUMNS: tuple[str, ...] = key_columns
RESULT_SPEC_FIELDS: tuple[str, ...] = ("target",)  # one results table holds runs over different columns


def required_columns(table: str, spec: TaskSpec, columns: Sequence[str] | None = None) -> list[str]:
    """Columns the table named by parameter ``table`` must have: the target, and ``row_id`` in the labels."""
    return {"table": [spec.target], "labels_table": ["row_id"]}.get(table, [])  # type: ignore[list-item]


def inputs_from_tables(frames: Mapping[str, pd.DataFrame], spec: TaskSpec) -> ImputationInputs:
    """The inputs from the tables read, keyed by the parameter that named each one. The labels table
    (``row_id`` and the target, or ``label``) is matched to the rows by ``row_id``."""
    table, target = frames["table"], spec.target
    labels = None
    if "labels_table" in frames:
        if "row_id" not in table.columns:
            raise InputError("a labels_table is matched by row_id: the table needs a row_id column")
        lab = frames["labels_table"]
        col = target if target in lab.columns else "label"
        if col not in lab.columns:
            raise InputError(f"labels_table needs a {target!r} or 'label' column")
        by_id = dict(zip(lab["row_id"].astype(str), lab[col]))
        labels = pd.Series([by_id.get(str(r)) for r in table["row_id"]], index=table.index, dtype="object")
    return ImputationInputs(table=table, target=target, labels=labels, demos=frames.get("demos_table"), spec=spec)


def keyed_by_content(inputs: ImputationInputs) -> bool:
    """Whether the table has no ``row_id`` column: its rows have positions only."""
    return "row_id" not in inputs.table.columns


# --- rendering -------------------------------------------------------------------------------


def _render(rows: pd.DataFrame, target: str, spec: TaskSpec) -> pd.DataFrame:
    cols = attribute_columns(rows.columns, spec.id_columns, (*spec.drop_columns, target))
    shown = spec.rename.get(target, target)
    question = " " + (spec.question or DEFAULT_QUESTION).replace("{target}", shown)
    bodies = [serialize_row(r, cols, spec.rename) + "." for r in rows[cols].to_dict("records")]
    return pd.DataFrame({"body": bodies, "question": question})


def _labels(inputs: ImputationInputs, mask: np.ndarray) -> list[Any]:
    if inputs.labels is None:
        return [None] * int(mask.sum())
    labels = inputs.labels
    if isinstance(labels, pd.Series):
        labels = labels.reindex(inputs.table.index)
    elif len(labels) != len(inputs.table):
        raise InputError(f"labels has {len(labels)} values for {len(inputs.table)} rows; "
                         "pass a Series indexed like the table or one value per row.")
    values = list(labels)
    return [None if is_missing(v) else str(v).strip() for v, m in zip(values, mask) if m]
