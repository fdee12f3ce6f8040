"""Which items a run answers: their identities, and what earlier attempts left to do (plain Python).

An item's identity is ``(row_key, occurrence)``: its key values as JSON text (``["3", "17"]`` for
a Magellan pair, ``["42", "city"]`` for an error-detection cell), and how many earlier items had
the same key (0 for the first), so identities are unique even when keys are duplicated or null.

A table without keys (left_/right_ pairs without ``pair_id``, imputation and error-detection
tables without ``row_id``) only has positions, and a position names another row after an insert
or a delete. Such items are keyed by their content instead -- ``{"content": "<sha256 of the row's
text and question>"}``: a row keeps its identity wherever it moves, an edited row is a new item,
and identical rows are told apart by ``occurrence``. Their ``pair_id`` / ``row_id`` columns still
hold the positions, as of the latest run.

An item is answered when its identity is stored with the same ``prompt_hash``: a changed row, set
of demonstrations or spec changes the prompt, and the item is answered again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from wrangling_tasks.base import is_missing

__all__ = ["identities", "row_identity", "key_text", "pending", "replaced"]


def identities(items: pd.DataFrame, keys: Sequence[str], by_content: bool) -> pd.DataFrame:
    """``row_key, occurrence`` of every item (as ``make_items`` renders them: keys, body, question)."""
    if by_content:
        row_key = [json.dumps({"content": hashlib.sha256(f"{b}\x1f{q}".encode("utf-8")).hexdigest()[:16]})
                   for b, q in zip(items["body"], items["question"])]
        occurrence = _occurrences(row_key)
    else:
        row_key, occurrence = row_identity(items, keys)
    return pd.DataFrame({"row_key": row_key, "occurrence": pd.array(occurrence, dtype="int64")})


def row_identity(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], list[int]]:
    """(row_key, occurrence) per row: the key values as JSON text, and how many earlier rows
    had the same key (0 for the first). Unique even when keys are duplicated or null."""
    row_key = [json.dumps([key_text(v) for v in vals], ensure_ascii=False)
               for vals in frame[list(keys)].itertuples(index=False, name=None)]
    return row_key, _occurrences(row_key)


def _occurrences(row_key: list[str]) -> list[int]:
    return [int(o) for o in pd.Series(row_key, dtype=object).groupby(row_key).cumcount().tolist()]


def key_text(value: Any) -> str | None:
    """A key value as text; integral floats (ids in a column with NULLs) print as integers."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _done(answered: pd.DataFrame, items: pd.DataFrame, by_prompt: bool) -> tuple[set, list]:
    cols = ["row_key", "occurrence", *(["prompt_hash"] if by_prompt else [])]
    norm = [answered[c].astype(int) if c == "occurrence" else answered[c] for c in cols]
    mine = [items[c].astype(int) if c == "occurrence" else items[c] for c in cols]
    return set(zip(*norm)), list(zip(*mine))


def pending(items: pd.DataFrame, answered: pd.DataFrame) -> pd.DataFrame:
    """Items not yet answered, in input order: identity not stored, or (when both frames carry
    ``prompt_hash``) stored under another prompt."""
    if answered.empty:
        return items
    by_prompt = "prompt_hash" in answered.columns and "prompt_hash" in items.columns
    done, mine = _done(answered, items, by_prompt)
    return items[[t not in done for t in mine]]


def replaced(todo: pd.DataFrame, answered: pd.DataFrame) -> int:
    """Of the pending items ``todo``, how many are stored already (under another prompt)."""
    if answered.empty or todo.empty:
        return 0
    done, mine = _done(answered, todo, False)
    return sum(t in done for t in mine)
