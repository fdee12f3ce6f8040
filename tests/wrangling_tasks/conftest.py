"""Fixtures for wrangling_tasks tests."""

from __future__ import annotations

import pandas as pd
import pytest
from wt_fakes import FakeLLM


@pytest.fixture
def fake_llm():
    return FakeLLM()


@pytest.fixture
def tables():
    """A tiny Magellan dataset: 6 left, 6 right entities, 10 labelled pairs."""
    left = pd.DataFrame({"id": range(6), "name": [f"item {i}" for i in range(6)],
                         "price": [1.5, None, 3.0, 4.0, 5.0, 6.0]})
    right = pd.DataFrame({"id": range(6), "name": [f"thing {i}" for i in range(6)],
                          "price": ["1.5", "2", None, "4", "5", "6"]})
    pairs = pd.DataFrame({"ltable_id": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
                          "rtable_id": [0, 1, 2, 3, 4, 5, 1, 2, 3, 4],
                          "label": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]})
    return left, right, pairs
