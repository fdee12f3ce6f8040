"""Great Expectations checks on prediction outputs, built in code (no GX project folder).

Per task the outputs must have: non-null, unique keys; a non-null answer in the task's
allowed set (when the task has one); and exactly as many rows as went in. The result of a
validation is returned as an :class:`OutputCheck` that says, row by row, why a row failed,
so that the caller can quarantine those rows instead of dropping them.
:meth:`OutputCheck.raise_for_failure` raises :class:`OutputValidationError`, a typed error
that carries the whole Great Expectations result.

Great Expectations takes 4-6 s to import, so it is imported lazily, on the first validation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["OutputCheck", "OutputValidationError", "output_suite", "validate_outputs"]


class OutputValidationError(ValueError):
    """Outputs failed their expectations; ``.check`` holds the details and GX result."""

    def __init__(self, message: str, check: "OutputCheck") -> None:
        super().__init__(message)
        self.check = check

    @property
    def result(self) -> Any:
        """The Great Expectations ``ExpectationSuiteValidationResult``."""
        return self.check.result


@dataclass(frozen=True)
class OutputCheck:
    """What a validation found.

    ``row_reasons`` maps a row's position (0-based, in the frame's order) to the reasons it
    failed; ``table_reasons`` lists failures of the table as a whole (e.g. its row count).
    """

    success: bool
    result: Any
    row_reasons: dict[int, list[str]] = field(default_factory=dict)
    table_reasons: list[str] = field(default_factory=list)

    @property
    def failed_rows(self) -> list[int]:
        return sorted(self.row_reasons)

    def reason(self, position: int) -> str | None:
        """All reasons row ``position`` failed, joined by ``"; "`` (None if it passed)."""
        reasons = self.row_reasons.get(position)
        return "; ".join(reasons) if reasons else None

    def raise_for_failure(self) -> None:
        if self.success:
            return
        parts = list(self.table_reasons)
        if self.row_reasons:
            parts.append(f"{len(self.row_reasons)} row(s) failed, e.g. row "
                         f"{self.failed_rows[0]}: {self.reason(self.failed_rows[0])}")
        raise OutputValidationError("output validation failed: " + "; ".join(parts), self)


@functools.lru_cache(maxsize=1)
def _context() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def output_suite(
    key_columns: Sequence[str],
    *,
    allowed_answers: Iterable[Any] | None,
    expected_rows: int | None,
    answer_column: str = "answer",
    name: str = "wrangle-outputs",
) -> Any:
    """The expectation suite for one task's outputs (a ``gx.ExpectationSuite``)."""
    _context()  # imports GX once
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=name)
    for col in key_columns:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
    if len(key_columns) == 1:
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column=key_columns[0]))
    elif key_columns:
        suite.add_expectation(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(key_columns)))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=answer_column))
    if allowed_answers is not None:
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeInSet(column=answer_column, value_set=list(allowed_answers))
        )
    if expected_rows is not None:
        suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=int(expected_rows)))
    return suite


def _reason(config: Any, allowed: list[Any] | None) -> str:
    kind = config.type
    kw = config.kwargs
    if kind == "expect_column_values_to_not_be_null":
        return f"{kw['column']} is null"
    if kind == "expect_column_values_to_be_unique":
        return f"duplicate key {kw['column']}"
    if kind == "expect_compound_columns_to_be_unique":
        return f"duplicate key ({', '.join(kw['column_list'])})"
    if kind == "expect_column_values_to_be_in_set":
        return f"{kw['column']} not in allowed set {allowed}"
    return kind


def validate_outputs(
    frame: pd.DataFrame,
    key_columns: Sequence[str],
    *,
    allowed_answers: Iterable[Any] | None,
    expected_rows: int | None = None,
    answer_column: str = "answer",
) -> OutputCheck:
    """Validate ``frame`` (one row per input item) and say which rows failed and why."""
    missing = [c for c in [*key_columns, answer_column] if c not in frame.columns]
    if missing:
        raise KeyError(f"outputs lack column(s) {missing}")
    allowed = None if allowed_answers is None else list(allowed_answers)
    suite = output_suite(
        key_columns, allowed_answers=allowed, expected_rows=expected_rows,
        answer_column=answer_column,
    )
    data = frame[[*key_columns, answer_column]].reset_index(drop=True)
    if allowed is not None and all(isinstance(a, bool) for a in allowed):
        data[answer_column] = data[answer_column].astype(object)  # nullable -> plain bools/None
    batch = _context().data_sources.pandas_default.read_dataframe(data)
    result = batch.validate(suite, result_format="COMPLETE")

    row_reasons: dict[int, list[str]] = {}
    table_reasons: list[str] = []
    for res in result.results:
        if res.success:
            continue
        info = res.exception_info or {}
        if info.get("raised_exception"):
            table_reasons.append(
                f"{res.expectation_config.type} raised: {info.get('exception_message')}"
            )
            continue
        if res.expectation_config.type == "expect_table_row_count_to_equal":
            table_reasons.append(
                f"row count {res.result.get('observed_value')} != expected "
                f"{res.expectation_config.kwargs['value']}"
            )
            continue
        why = _reason(res.expectation_config, allowed)
        for pos in res.result.get("unexpected_index_list") or []:
            row_reasons.setdefault(int(pos), []).append(why)
    return OutputCheck(
        success=bool(result.success), result=result,
        row_reasons=row_reasons, table_reasons=table_reasons,
    )
