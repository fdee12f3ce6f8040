"""Parsers: model text -> typed answers; Ditto lines -> pairs."""

from __future__ import annotations

import pandas as pd
import pytest

from wrangling_tasks.datasets import parse_ditto_entity, read_ditto
from wrangling_tasks.scoring import normalize_value, parse_value, parse_yes_no


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), (" yes", True), ("YES.", True), ("yes, they are the same", True), ("Yes\nNo", True),
    ("  No", False), ("no.", False), ("No, Product A class: 425", False), ("NO!", False),
    ("'Yes'", True), ("**No**", False), ("Answer: Yes", True), ("true", True), ("False", False),
    ("", None), (None, None), ("   ", None), ("maybe", None), ("Not the same", None),
    ("Nope", None), ("yesterday", None), ("\nYes", True), ("The answer is yes", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


@pytest.mark.parametrize("text, expected", [
    (" san francisco", "san francisco"), ("New York.", "New York"), ("Sony\nCanon", "Sony"),
    ("'Sony'", "Sony"), ("Canon;", "Canon"), ("  ", None), ("", None), (None, None), (".", None),
    ("OMNIMOUNT SYSTEMS, INC", "OMNIMOUNT SYSTEMS, INC"), ("w. hollywood", "w. hollywood"),
])
def test_parse_value(text, expected):
    assert parse_value(text) == expected


def test_normalize_value_ignores_case_and_spacing():
    assert normalize_value("  New   York ") == normalize_value("new york") == "new york"
    assert normalize_value(None) is None and normalize_value(float("nan")) is None and normalize_value(" ") is None


def test_parse_ditto_entity_handles_empty_and_spaced_values():
    got = parse_ditto_entity("COL Song_Name VAL Over it ( Live ) COL Genre VAL  COL Price VAL $ 1.29 ")
    assert got == {"Song_Name": "Over it ( Live )", "Genre": None, "Price": "$ 1.29"}


def test_read_ditto_builds_left_right_columns(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("COL a VAL x COL b VAL y \tCOL a VAL x2 COL b VAL \t1\n"
                    "COL a VAL p COL b VAL q\tCOL a VAL r COL b VAL s\t0\n", encoding="utf-8")
    df = read_ditto(path)
    assert list(df.columns) == ["left_a", "left_b", "right_a", "right_b", "label"]
    assert df.iloc[0, :3].tolist() == ["x", "y", "x2"] and pd.isna(df.iloc[0, 3])
    assert df["label"].tolist() == [1, 0]


def test_read_ditto_rejects_malformed_lines(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("COL a VAL x\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_ditto(path)
