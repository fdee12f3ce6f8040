"""Row -> text: ``col: value. col: value`` (the paper's serialisation), always on one line.

A prompt's structure is its lines: demonstrations are separated by a blank line, each record and
its question sit on one line, and generation stops at the first newline. So the one thing a cell
(or a column name from the table) must never bring into a prompt is a line break: a cell holding
``"x\\n\\nProduct A is y. ... the same? Yes"`` would otherwise forge a demonstration. Line breaks
become one space. ``". "`` and ``": "`` are left as they are: ordinary values hold them
("St. Louis", "Note: dry"), and without a line break they cannot leave the record's line.
Special-token strings (``<|im_end|>``) stay as text here; the engine tokenizes prompt text with
special tokens split (engine.prompts.encode_text), so they reach the model as plain characters.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from wrangling_tasks.base import is_missing

SEP = ". "

# Every character str.splitlines() breaks at, with the whitespace around it.
_LINE_BREAK = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]\s*")


def one_line(text: str) -> str:
    """``text`` with each line break (and the whitespace around it) replaced by one space.

    >>> one_line("12 Main St\\r\\n  Springfield")
    '12 Main St Springfield'
    """
    return _LINE_BREAK.sub(" ", text)


def format_value(value: Any) -> str:
    """One cell as text: missing -> "", otherwise ``str(value)`` stripped."""
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
    """``"col: value. col: value"`` over ``columns`` on one line; no trailing period.

    >>> serialize_row({"name": "Fat Tire", "abv": None}, ["name", "abv"])
    'name: Fat Tire. abv: '
    """
    rename = rename or {}
    return SEP.join(f"{one_line(str(rename.get(c, c)))}: {one_line(format_value(row.get(c)))}" for c in columns)


def serialize_cell(col: str, value: Any, rename: Mapping[str, str] | None = None) -> str:
    """One cell as ``"col: value"``."""
    return serialize_row({col: value}, [col], rename)
