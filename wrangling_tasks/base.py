"""The shape every wrangling task shares: a spec (data), a protocol (functions), a result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import pandas as pd

# Columns that identify a row rather than describe it: never serialised into a prompt.
DEFAULT_ID_COLUMNS: tuple[str, ...] = (
    "id", "index", "Unnamed: 0", "row_id", "pair_id", "ltable_id", "rtable_id", "label",
)


class InputError(ValueError):
    """Bad task input (missing columns, empty table, unknown dataset...); the message names the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """How one table becomes prompts. Dataset specifics live here as data, not code.

    Any field left ``None`` takes the task's default (see each task module).
    """

    name: str = "custom"  # dataset name, for reports only
    drop_columns: tuple[str, ...] = ()  # attributes never shown to the model (dropped before renaming)
    rename: Mapping[str, str] = field(default_factory=dict)  # attribute -> name shown in the prompt
    id_columns: tuple[str, ...] = DEFAULT_ID_COLUMNS  # skipped when serialising a row
    entity: str = "Product"  # entity noun for matching: "Product A is ..."
    question: str | None = None  # question template; placeholders {entity}, {target}, {cell}
    target: str | None = None  # imputation: the column to fill
    columns: tuple[str, ...] | None = None  # error detection: the columns to check (None = all attributes)
    max_new_tokens: int | None = None  # decoding budget per answer
    answer_prefix: str = ""  # text after the question, e.g. "\nAnswer:"; "" is the paper's format

    def __hash__(self) -> int:  # `rename` is a dict: hash its items
        values = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rename")
        return hash((values, tuple(sorted(self.rename.items()))))

    def replace(self, **changes: Any) -> "TaskSpec":
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Expectations:
    """What a valid predictions table looks like; the flows turn this into data checks."""

    key_columns: tuple[str, ...]  # unique together, never null
    allowed_answers: tuple[Any, ...] | None  # non-null answers must be one of these (None = free text)
    required_columns: tuple[str, ...]  # present in every predictions table
    row_count: int | None = None  # exact number of rows expected (one per input item)
    nullable_columns: tuple[str, ...] = ("answer", "label")  # null answer = unparseable -> quarantine


@dataclass
class RunResult:
    """Outcome of :func:`wrangling_tasks.run`."""

    task: str
    predictions: pd.DataFrame  # one row per input item, in input order
    metrics: dict[str, Any] | None  # None when no item has a label
    seconds: float  # wall time of the whole run (prompting, inference, parsing, scoring)
    rows_per_s: float  # items / seconds
    key_columns: tuple[str, ...]
    allowed_answers: tuple[Any, ...] | None
    prefix: str = ""  # the shared few-shot prefix ("" for k = 0)
    n_demos: int = 0  # demonstrations in the shared prefix
    generate_seconds: float = 0.0  # time inside the llm calls only
    spec: TaskSpec | None = None
    warnings: list[str] = field(default_factory=list)

    def expectations(self) -> Expectations:
        """Checks the predictions table of this run must pass."""
        return Expectations(
            key_columns=self.key_columns,
            allowed_answers=self.allowed_answers,
            required_columns=PREDICTION_COLUMNS,
            row_count=len(self.predictions),
        )


@dataclass
class Prepared:
    """Prompts built by :func:`wrangling_tasks.prepare`, before any inference."""

    task: str
    items: pd.DataFrame  # keys..., prompt, prompt_hash, label, n_demos, truncated; input order
    key_columns: tuple[str, ...]
    allowed_answers: tuple[Any, ...] | None
    spec: TaskSpec  # with the task defaults filled in (question, max_new_tokens)
    prefix: str = ""
    n_demos: int = 0
    warnings: list[str] = field(default_factory=list)


# Columns of every predictions table, after the key columns.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "prompt", "prompt_hash", "raw_output", "answer", "label", "n_demos", "truncated",
)


class Task(Protocol):
    """Every task module provides these names (the modules are the task objects)."""

    NAME: str
    key_columns: tuple[str, ...]  # default keys (matching with left_/right_ pairs uses ``pair_id``)
    allowed_answers: tuple[Any, ...] | None  # (True, False) for Yes/No tasks, None for free text
    choices: tuple[str, ...] | None  # answer texts for choice scoring, e.g. ("Yes", "No")
    default_max_new_tokens: int
    # How a run reads the task from database tables and stores its answers (flows/ builds on these,
    # so a new task needs no change there):
    TABLES: tuple[str, ...]  # the table parameters it reads (`table` first); any other is an error
    OPTIONS: tuple[str, ...]  # the task-specific parameters it takes ("target", "columns")
    REQUIRED_OPTIONS: Mapping[str, str]  # option -> what it is, for options a run cannot do without
    RESULT_KEY_COLUMNS: tuple[str, ...]  # key columns of its results table: every layout's keys
    RESULT_SPEC_FIELDS: tuple[str, ...]  # spec fields each results row records ("target")

    def default_spec(self) -> TaskSpec: ...

    def required_columns(self, table: str, spec: TaskSpec, columns: Sequence[str] | None = None) -> list[str]:
        """Columns the table named by parameter ``table`` must have, checked before it is read."""

    def inputs_from_tables(self, frames: Mapping[str, pd.DataFrame], spec: TaskSpec) -> Any:
        """The task's inputs from the tables read, keyed by the parameter that named each one."""

    def keyed_by_content(self, inputs: Any) -> bool:
        """Whether the inputs have no key column (items have positions only): flows key them by content."""

    def coerce_inputs(self, inputs: Any, spec: TaskSpec) -> Any: ...

    def make_items(self, inputs: Any, spec: TaskSpec) -> pd.DataFrame:
        """Items to answer: key columns, ``body``, ``question``, ``label`` (nullable)."""

    def demo_pool(self, inputs: Any, spec: TaskSpec) -> pd.DataFrame:
        """Labelled examples outside the items: ``body``, ``question``, ``label``."""

    def format_answer(self, label: Any) -> str: ...

    def parse(self, text: str | None) -> Any: ...

    def score(self, answers: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]: ...

    def expectations(self, spec: TaskSpec | None = None) -> Expectations: ...


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str, fix: str = "") -> None:
    """Raise :class:`InputError` naming the missing columns of ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = f" {fix}" if fix else ""
        raise InputError(
            f"{what} is missing column(s) {missing}; it has {list(frame.columns)}.{hint}"
        )


def require_rows(frame: pd.DataFrame, what: str) -> None:
    """Raise :class:`InputError` when ``frame`` is empty."""
    if len(frame) == 0:
        raise InputError(f"{what} is empty: pass at least one row.")


def is_missing(value: Any) -> bool:
    """True for None, NaN, NaT and pd.NA."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: not a missing scalar
        return False


def to_bool(value: Any) -> bool | None:
    """Coerce a label (1/0, True/False, "yes"/"no", "1"/"0") to bool; missing -> None."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "yes", "true", "y", "t", "1.0"):
            return True
        if v in ("0", "no", "false", "n", "f", "0.0"):
            return False
        raise InputError(f"label {value!r} is not a yes/no value; use 1/0, True/False or Yes/No.")
    return bool(value)
