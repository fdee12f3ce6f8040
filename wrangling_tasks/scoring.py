"""Parsing model text into typed answers, and the metrics (true F1, accuracy)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from wrangling_tasks.base import is_missing

# Optional "Answer:" / "A:" lead-in, opening quotes or brackets, then yes/no as a whole word.
_YES_NO = re.compile(r"^(?:answer\s*:|a\s*:)?[\s\"'`*(\[]*(yes|no|true|false)(?![a-z0-9])", re.I)
_TRAILING_PUNCT = ".,;:!?"
_QUOTES = "\"'`"


def first_line(text: str | None) -> str:
    """The model's answer up to the first newline (in case the stop did not fire)."""
    if text is None:
        return ""
    return text.strip().split("\n", 1)[0].strip()


def parse_yes_no(text: str | None) -> bool | None:
    """``"Yes"`` / ``" yes."`` / ``"YES, same"`` -> True; ``"No"`` -> False; else None.

    Robust to case, surrounding whitespace, quotes and trailing text; unparseable
    text (``""``, ``"maybe"``, ``"Not sure"``) gives None, which callers quarantine.
    """
    m = _YES_NO.match(first_line(text))
    if m is None:
        return None
    return m.group(1).lower() in ("yes", "true")


def parse_value(text: str | None) -> str | None:
    """Free-text answer: first line, stripped of whitespace, quotes and trailing punctuation.

    Case is kept (``normalize_value`` is used for comparison); empty -> None.
    """
    value = first_line(text)
    prev = None
    while value != prev:
        prev = value
        value = value.strip().rstrip(_TRAILING_PUNCT).strip(_QUOTES).strip()
    return value or None


def normalize_value(value: Any) -> str | None:
    """Comparison key for free-text answers: lower case, single spaces; missing -> None."""
    if is_missing(value):
        return None
    text = " ".join(str(value).split()).lower()
    return text or None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def binary_metrics(answers: Sequence[bool | None], labels: Sequence[bool | None]) -> dict[str, Any]:
    """Precision, recall, true harmonic-mean F1, accuracy and confusion counts.

    Only items with a label count. An unanswered item (answer None) is wrong: a
    missed positive is a false negative, an unanswered negative a false positive;
    their number is reported as ``unanswered``. F1 is 0 when P + R = 0.
    """
    tp = fp = fn = tn = unanswered = 0
    for answer, label in zip(answers, labels, strict=True):
        if label is None or is_missing(label):
            continue
        label = bool(label)
        if answer is None or is_missing(answer):
            unanswered += 1
            answer = not label  # counted as wrong
        if answer and label:
            tp += 1
        elif answer and not label:
            fp += 1
        elif label:
            fn += 1
        else:
            tn += 1
    n = tp + fp + fn + tn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": n,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "accuracy": _ratio(tp + tn, n),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "unanswered": unanswered,
        "positives": tp + fn,
    }


def accuracy_metrics(answers: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Exact-match accuracy after :func:`normalize_value`; unanswered items are wrong."""
    n = correct = unanswered = 0
    for answer, label in zip(answers, labels, strict=True):
        gold = normalize_value(label)
        if gold is None:
            continue
        n += 1
        pred = normalize_value(answer)
        if pred is None:
            unanswered += 1
        elif pred == gold:
            correct += 1
    return {"n": n, "accuracy": _ratio(correct, n), "correct": correct, "unanswered": unanswered}
