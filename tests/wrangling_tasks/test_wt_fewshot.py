"""Choosing demonstrations: k, seed, class balance."""

from __future__ import annotations

import pandas as pd
import pytest

from wrangling_tasks.fewshot import choose_demos, format_prefix


@pytest.fixture
def pool():
    return pd.DataFrame({"body": [f"q{i}" for i in range(20)], "label": [i < 3 for i in range(20)]})


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_balanced_takes_both_classes(pool, k):
    demos = choose_demos(pool, k, seed=1, balanced=True)
    assert len(demos) == k
    n_pos = int(demos["label"].sum())
    assert abs(n_pos - (k - n_pos)) <= 1 or n_pos == 3  # only 3 positives exist
    assert demos.index.is_unique


def test_balanced_fills_from_other_class_when_short(pool):
    demos = choose_demos(pool, 10, seed=0, balanced=True)
    assert len(demos) == 10 and int(demos["label"].sum()) == 3


def test_seed_reproducible_and_varies(pool):
    a = choose_demos(pool, 4, seed=7, balanced=True)
    b = choose_demos(pool, 4, seed=7, balanced=True)
    assert a["body"].tolist() == b["body"].tolist()
    others = {tuple(choose_demos(pool, 4, seed=s)["body"]) for s in range(5)}
    assert len(others) > 1


def test_k_zero_and_k_larger_than_pool(pool):
    assert len(choose_demos(pool, 0)) == 0
    assert len(choose_demos(pool, 50)) == 20
    assert len(choose_demos(pool.iloc[:0], 3)) == 0
    with pytest.raises(ValueError):
        choose_demos(pool, -1)


def test_unlabelled_rows_are_never_demos():
    pool = pd.DataFrame({"body": ["a", "b", "c"], "label": ["x", None, "y"]})
    assert set(choose_demos(pool, 3)["body"]) == {"a", "c"}


def test_prefix_of_fewer_demos_is_a_string_prefix():
    demos = ["d1 Yes", "d2 No", "d3 No"]
    assert format_prefix(demos) == "d1 Yes\n\nd2 No\n\nd3 No\n\n"
    assert format_prefix(demos).startswith(format_prefix(demos[:2]))
    assert format_prefix([]) == ""
