"""Entity matching: are two records the same entity? -> Yes / No.

Prompt (paper): ``Product A is {row A}. Product B is {row B}. Are Product A and Product B the same?``
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
from wrangling_tasks.serialize import attribute_columns, serialize_row

NAME = "entity-matching"
key_columns: tuple[str, ...] = ("ltable_id", "rtable_id")  # Magellan layout
PAIR_KEY: tuple[str, ...] = ("pair_id",)  # left_/right_ layout: row position, or a pair_id column
allowed_answers: tuple[Any, ...] = (True, False)
choices: tuple[str, ...] = ("Yes", "No")
default_max_new_tokens = 3
DEFAULT_QUESTION = "Are {entity} A and {entity} B the same?"

_LAYOUT_HELP = (
    "Pass either pairs with columns ltable_id, rtable_id[, label] plus the left and right "
    "tables (each with an 'id' column), or one pairs table with left_<attr> / right_<attr> "
    "columns[, label]."
)


@dataclass
class MatchingInputs:
    """Candidate pairs to match, in one of two layouts (see module docstring of the package)."""

    pairs: pd.DataFrame  # ltable_id, rtable_id[, label]  or  left_<attr>, right_<attr>[, label]
    left: pd.DataFrame | None = None  # Magellan tableA, keyed by `id`
    right: pd.DataFrame | None = None  # Magellan tableB, keyed by `id`
    demos: pd.DataFrame | None = None  # labelled pairs for few-shot, either layout
    spec: TaskSpec | None = None  # dataset spec (set by load_benchmark)


def default_spec() -> TaskSpec:
    """Task defaults: the paper's question, noun "Product", 3 new tokens."""
    return TaskSpec(question=DEFAULT_QUESTION, max_new_tokens=default_max_new_tokens)


def coerce_inputs(inputs: Any, spec: TaskSpec) -> MatchingInputs:
    """Accept :class:`MatchingInputs` or a left_/right_ pairs DataFrame."""
    if isinstance(inputs, MatchingInputs):
        return inputs
    if isinstance(inputs, pd.DataFrame):
        return MatchingInputs(pairs=inputs)
    raise InputError(f"entity matching needs MatchingInputs or a DataFrame, got {type(inputs).__name__}. {_LAYOUT_HELP}")


def layout(pairs: pd.DataFrame) -> str:
    """``"magellan"`` (ltable_id/rtable_id) or ``"pairs"`` (left_/right_ columns)."""
    cols = set(pairs.columns)
    if {"ltable_id", "rtable_id"} <= cols:
        return "magellan"
    if any(c.startswith("left_") for c in map(str, cols)) and any(c.startswith("right_") for c in map(str, cols)):
        return "pairs"
    raise InputError(f"pairs table has neither layout (columns {list(pairs.columns)}). {_LAYOUT_HELP}")


def keys_for(inputs: MatchingInputs) -> tuple[str, ...]:
    """Key columns of the predictions for these inputs."""
    return key_columns if layout(inputs.pairs) == "magellan" else PAIR_KEY


def make_items(inputs: MatchingInputs, spec: TaskSpec) -> pd.DataFrame:
    """One item per pair: keys, ``body``, ``question``, ``label`` (nullable boolean)."""
    require_rows(inputs.pairs, "the pairs table")
    return _render(inputs.pairs, inputs, spec)


def demo_pool(inputs: MatchingInputs, spec: TaskSpec) -> pd.DataFrame:
    """Labelled demonstration pairs (``inputs.demos``), minus pairs that are also items."""
    if inputs.demos is None or len(inputs.demos) == 0:
        return pd.DataFrame({"body": [], "question": [], "label": pd.array([], dtype="boolean")})
    require_columns(inputs.demos, ["label"], "the demos table", "Demonstrations need a label (1 = match).")
    pool = _render(inputs.demos, inputs, spec)
    if layout(inputs.demos) == "magellan" and layout(inputs.pairs) == "magellan":
        items = set(zip(inputs.pairs["ltable_id"].astype(str), inputs.pairs["rtable_id"].astype(str)))
        keep = [(str(a), str(b)) not in items for a, b in zip(pool["ltable_id"], pool["rtable_id"])]
        pool = pool[keep]
    return pool


def format_answer(label: Any) -> str:
    """``True -> "Yes"``, ``False -> "No"``."""
    return "Yes" if to_bool(label) else "No"


def parse(text: str | None) -> bool | None:
    """Model text -> True (match) / False / None (unparseable)."""
    return scoring.parse_yes_no(text)


def score(answers: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Precision, recall, F1 (true harmonic mean), accuracy, confusion counts."""
    return scoring.binary_metrics(answers, labels)


def expectations(spec: TaskSpec | None = None) -> Expectations:
    """Checks a predictions table must pass (Magellan keys; ``pair_id`` for left_/right_ pairs)."""
    return Expectations(key_columns, allowed_answers, PREDICTION_COLUMNS)


# --- inputs from database tables -------------------------------------------------------------

TABLES: tuple[str, ...] = ("table", "left_table", "right_table", "demos_table")  # `table`: the pairs
OPTIONS: tuple[str, ...] = ()
REQUIRED_OPTIONS: Mapping[str, str] = {}
RESULT_KEY_COLUMNS: tuple[str, ...] = ("ltable_id", "rtable_id", "pair_id")  # both layouts share one table
RESULT_SPEC_FIELDS: tuple[str, ...] = ()


def required_columns(table: str, spec: TaskSpec, columns: Sequence[str] | None = None) -> list[str]:
    """Columns the table named by parameter ``table`` must have: entity tables are keyed by ``id``."""
    return ["id"] if table in ("left_table", "right_table") else []


def inputs_from_tables(frames: Mapping[str, pd.DataFrame], spec: TaskSpec) -> MatchingInputs:
    """The inputs from the tables read, keyed by the parameter that named each one."""
    return MatchingInputs(pairs=frames["table"], left=frames.get("left_table"), right=frames.get("right_table"),
                          demos=frames.get("demos_table"), spec=spec)


def keyed_by_content(inputs: MatchingInputs) -> bool:
    """Whether the pairs have no key column (left_/right_ pairs without ``pair_id``): positions only."""
    return layout(inputs.pairs) == "pairs" and "pair_id" not in inputs.pairs.columns


# --- rendering -------------------------------------------------------------------------------


def _render(pairs: pd.DataFrame, inputs: MatchingInputs, spec: TaskSpec) -> pd.DataFrame:
    noun = spec.entity
    question = " " + (spec.question or DEFAULT_QUESTION).replace("{entity}", noun)
    if layout(pairs) == "magellan":
        out = pairs[["ltable_id", "rtable_id"]].reset_index(drop=True).copy()
        texts_a = _entity_texts(inputs.left, pairs["ltable_id"], spec, "left (tableA)")
        texts_b = _entity_texts(inputs.right, pairs["rtable_id"], spec, "right (tableB)")
    else:
        out = pd.DataFrame({"pair_id": _pair_ids(pairs)})
        texts_a = _side_texts(pairs, "left_", spec)
        texts_b = _side_texts(pairs, "right_", spec)
    out["body"] = [f"{noun} A is {a}. {noun} B is {b}." for a, b in zip(texts_a, texts_b)]
    out["question"] = question
    labels = [to_bool(v) for v in pairs["label"]] if "label" in pairs.columns else [None] * len(pairs)
    out["label"] = pd.array(labels, dtype="boolean")
    return out


def _entity_texts(table: pd.DataFrame | None, ids: pd.Series, spec: TaskSpec, side: str) -> list[str]:
    if table is None:
        raise InputError(f"Magellan pairs need the {side} table; pass MatchingInputs(pairs, left=..., right=...).")
    require_columns(table, ["id"], f"the {side} table", "Entity tables are keyed by an 'id' column.")
    cols = attribute_columns(table.columns, spec.id_columns, spec.drop_columns)
    wanted = set(ids.astype(str))
    sub = table[table["id"].astype(str).isin(wanted)]
    by_id = {str(r["id"]): serialize_row(r, cols, spec.rename) for r in sub.to_dict("records")}
    missing = sorted(wanted - by_id.keys())
    if missing:
        raise InputError(f"{len(missing)} id(s) of the pairs are not in the {side} table, e.g. {missing[:5]}.")
    return [by_id[str(i)] for i in ids]


def _side_texts(pairs: pd.DataFrame, prefix: str, spec: TaskSpec) -> list[str]:
    attrs = [str(c)[len(prefix):] for c in pairs.columns if str(c).startswith(prefix)]
    cols = attribute_columns(attrs, spec.id_columns, spec.drop_columns)
    side = pairs[[prefix + c for c in cols]]
    side.columns = cols
    return [serialize_row(r, cols, spec.rename) for r in side.to_dict("records")]


def _pair_ids(pairs: pd.DataFrame) -> list[Any]:
    if "pair_id" in pairs.columns:
        ids = list(pairs["pair_id"])
        if len(set(ids)) != len(ids):
            raise InputError("pair_id values must be unique; drop the column to number pairs by position.")
        return ids
    return list(range(len(pairs)))
