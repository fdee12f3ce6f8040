"""Choosing and formatting demonstrations: k labelled examples, one shared prefix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

DEMO_SEP = "\n\n"  # demonstrations are separated by a blank line


def choose_demos(pool: pd.DataFrame, k: int, seed: int = 0, balanced: bool = False) -> pd.DataFrame:
    """Pick ``k`` rows of ``pool`` (with a ``label`` column) reproducibly from ``seed``.

    ``balanced`` (Yes/No tasks): half True, half False labels (the odd one goes to a
    class drawn from the seed); a class short of examples is filled from the other.
    The chosen rows come back in a seeded random order. ``k`` larger than the pool
    takes the whole pool.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}.")
    pool = pool[pool["label"].notna()] if "label" in pool.columns else pool
    if k == 0 or len(pool) == 0:
        return pool.iloc[:0]
    rng = np.random.default_rng(seed)
    if not balanced:
        picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return pool.iloc[np.sort(picked)].iloc[rng.permutation(len(picked))]
    labels = pool["label"].astype(bool).to_numpy()
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    n_pos = k // 2 + (k % 2 if rng.random() < 0.5 else 0)
    n_pos = min(n_pos, len(pos))
    n_neg = min(k - n_pos, len(neg))
    n_pos = min(k - n_neg, len(pos))  # refill positives if negatives ran short
    picked = np.concatenate([
        rng.choice(pos, size=n_pos, replace=False),
        rng.choice(neg, size=n_neg, replace=False),
    ]).astype(int)
    return pool.iloc[picked[rng.permutation(len(picked))]]


def format_demo(query: str, answer: str) -> str:
    """One demonstration: the query followed by its answer after one space."""
    return f"{query} {answer}"


def format_prefix(demos: Sequence[str]) -> str:
    """The shared prefix: demonstrations separated by blank lines, then a blank line.

    ``format_prefix(demos[:j])`` is a string prefix of ``format_prefix(demos)``, so
    rows that get fewer demonstrations still share the start of the prompt.
    """
    return "".join(d + DEMO_SEP for d in demos)
