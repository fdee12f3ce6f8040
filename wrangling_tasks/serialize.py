"""Row -> text: ``col: value. col: value`` (the paper's serialisation)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from wrangling_tasks.base import is_missing

SEP = ". "


def format_value(value: Any) -> str:
    """One cell as prompt text: missing -> "", otherwise ``str(value)`` stripped."""
    if is_missing(value):
        return ""
    return str(value).strip()


def attribute_columns(
    columns: Iterable[str],
    id_columns: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> list[str]:
    """The columns shown to the model, in table order: not ids, not dropped."""
    skip = set(id_columns) | set(drop)
    return [c for c in columns if c not in skip]


def serialize_row(
    row: Mapping[str, Any],
    columns: Sequence[str],
    rename: Mapping[str, str] | None = None,
) -> str:
    """``"col: value. col: value"`` over ``columns``; no trailing period.

    >>> serialize_row({"name": "Fat Tire", "abv": None}, ["name", "abv"])
    'name: Fat Tire. abv: '
    """
    rename = rename or {}
    return SEP.join(f"{rename.get(c, c)}: {format_value(row.get(c))}" for c in columns)


def serialize_cell(col: str, value: Any, rename: Mapping[str, str] | None = None) -> str:
    """One cell as ``"col: value"``."""
    return serialize_row({col: value}, [col], rename)
