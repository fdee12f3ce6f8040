"""wrangling_tasks.checks: Great Expectations over outputs, with reasons per failing row."""

from __future__ import annotations

import pandas as pd
import pytest

from wrangling_tasks import checks


def frame(**cols):
    return pd.DataFrame(cols)


def test_clean_outputs_pass():
    out = frame(ltable_id=[1, 2], rtable_id=[1, 1],
                answer=pd.array([True, False], dtype="boolean"))
    check = checks.validate_outputs(out, ["ltable_id", "rtable_id"],
                                    allowed_answers=(True, False), expected_rows=2)
    assert check.success and check.failed_rows == [] and check.table_reasons == []
    check.raise_for_failure()  # no error


def test_each_failing_row_gets_its_reasons():
    out = frame(row_id=["a", "b", "b", None],
                answer=pd.array([True, None, False, True], dtype="boolean"))
    check = checks.validate_outputs(out, ["row_id"], allowed_answers=(True, False),
                                    expected_rows=4)
    assert not check.success
    assert check.failed_rows == [1, 2, 3]
    assert check.reason(0) is None
    assert "answer is null" in check.reason(1) and "duplicate key row_id" in check.reason(1)
    assert check.reason(2) == "duplicate key row_id"
    assert check.reason(3) == "row_id is null"


def test_compound_keys_and_answers_outside_the_allowed_set():
    out = frame(row_id=[1, 1, 2], col_name=["a", "b", "a"], answer=["yes", "no", "maybe"])
    check = checks.validate_outputs(out, ["row_id", "col_name"],
                                    allowed_answers=("yes", "no"))
    assert check.failed_rows == [2]
    assert "not in allowed set" in check.reason(2)
    dup = frame(row_id=[1, 1], col_name=["a", "a"], answer=["yes", "no"])
    check = checks.validate_outputs(dup, ["row_id", "col_name"], allowed_answers=("yes", "no"))
    assert check.failed_rows == [0, 1]
    assert check.reason(0) == "duplicate key (row_id, col_name)"


def test_free_text_answers_only_need_to_be_present():
    out = frame(row_id=[1, 2], answer=["paris", None])
    check = checks.validate_outputs(out, ["row_id"], allowed_answers=None)
    assert check.failed_rows == [1]


def test_row_count_mismatch_is_a_typed_error_carrying_the_result():
    out = frame(row_id=[1, 2], answer=["x", "y"])
    check = checks.validate_outputs(out, ["row_id"], allowed_answers=None, expected_rows=3)
    assert check.table_reasons == ["row count 2 != expected 3"]
    with pytest.raises(checks.OutputValidationError, match="row count 2 != expected 3") as err:
        check.raise_for_failure()
    assert err.value.check is check
    assert err.value.result.success is False  # the Great Expectations result


def test_missing_output_columns_are_reported():
    with pytest.raises(KeyError, match="answer"):
        checks.validate_outputs(frame(row_id=[1]), ["row_id"], allowed_answers=None)
