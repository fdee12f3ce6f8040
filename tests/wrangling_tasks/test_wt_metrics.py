"""Metric arithmetic on hand-made cases, including P + R < 1 and unanswered items."""

from __future__ import annotations

import pytest

from wrangling_tasks.scoring import accuracy_metrics, binary_metrics


def test_perfect():
    m = binary_metrics([True, False, True], [True, False, True])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (1.0, 1.0, 1.0, 1.0)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 0, 0, 1)


def test_true_f1_when_precision_plus_recall_below_one():
    # tp=1, fp=3, fn=3, tn=1: P = R = 0.25. True F1 = 0.25 (the original 2PR/max(1,P+R) gives 0.125).
    answers = [True, True, True, True, False, False, False, False]
    labels = [True, False, False, False, True, True, True, False]
    m = binary_metrics(answers, labels)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 3, 3, 1)
    assert m["precision"] == pytest.approx(0.25) and m["recall"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(0.25)
    assert m["accuracy"] == pytest.approx(0.25)


def test_asymmetric_precision_recall():
    # tp=1, fp=1, fn=4: P = 0.5, R = 0.2, F1 = 2*0.1/0.7
    m = binary_metrics([True, True, False, False, False, False], [True, False, True, True, True, True])
    assert m["f1"] == pytest.approx(0.2 / 0.7)


def test_zero_when_no_true_positive():
    m = binary_metrics([False, False, True], [True, True, False])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    m = binary_metrics([False, False], [False, False])  # no positives at all: no division error
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_unanswered_count_as_wrong_and_are_reported():
    m = binary_metrics([None, None, True], [True, False, True])
    assert m["unanswered"] == 2
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 0)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_unlabelled_items_are_ignored():
    m = binary_metrics([True, False], [None, True])
    assert m["n"] == 1 and m["fn"] == 1


def test_accuracy_metrics():
    m = accuracy_metrics(["New York", "la", None, "x"], ["new  york", "los angeles", "atlanta", None])
    assert m == {"n": 3, "accuracy": pytest.approx(1 / 3), "correct": 1, "unanswered": 1}


def test_lengths_must_match():
    with pytest.raises(ValueError):
        binary_metrics([True], [True, False])
