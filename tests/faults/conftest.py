"""Fixtures of the fault-injection suite. Every scenario reports its figures through ``fault_report``.

A scenario file adopts the suite in three lines::

    from fault_kit import trials                      # tests/faults/fault_kit.py

    @trials(fast=2, soak=40)                          # a few trials by default, many under -m soak
    def test_my_fault(trials, fault_report, ...):
        ...                                           # inject `trials` faults, check each outcome
        fault_report("corrupted offload file", trials=trials, faults=n_injected,
                     rows_lost=lost, duplicates=dups, outcome="clear error")

``fault_report`` appends one JSON line per call to the file named by ``FLEXWRANGLE_FAULT_REPORT``
(benchmarks/reliability.py sets it and sums the lines per scenario into docs/reliability.md), then
fails the test if a row was lost or duplicated: the suite's targets are 0 and 0. Without the
variable it only checks. Call it once per test with the test's totals (or once per trial: lines of
the same scenario add up). Also here: ``fault_rng``, a ``random.Random`` seeded by
``FLEXWRANGLE_FAULT_SEED`` (default 0) and the test's id, so a failing trial's choices replay; and ``em_fault_db``, a small entity-matching database whose
fake answers include unparseable ones, so that chunks write results and quarantine rows together.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import fault_kit  # noqa: F401  (puts tests/flows, hence flow_testkit, on the path)
import pytest
import flow_testkit
from flow_testkit import EM_PARAMS, magellan_frames, make_db

flow_testkit.register()   # the rule: fakes, for the runs in this process

REPORT_ENV = "FLEXWRANGLE_FAULT_REPORT"

# "recovered": the run completed, by itself (a retry) or when started again (resume), with every row;
# "clear error": it stopped with a message that names the problem and what to do, and lost nothing;
# "unaffected": the input or fault changed nothing (the run completed as it would without it).
OUTCOMES = ("recovered", "clear error", "unaffected")

# The fault database: EM_N pairs answered EM_CHUNK at a time; pairs whose names contain "odd" get an
# unparseable answer and are quarantined (chunks 1 and 3 of 4 write quarantine rows).
EM_N, EM_CHUNK, EM_ODD = 16, 4, (1, 10, 11)


@pytest.fixture
def fault_report(request):
    """``fault_report(scenario, *, trials, faults, rows_lost, duplicates, outcome, note="", counts=None)``.

    ``scenario``: one line of docs/reliability.md's table (calls with the same name add up);
    ``trials``: runs (or attempts) exercised; ``faults``: faults actually injected (a kill that came
    after the run had ended is not one); ``rows_lost`` / ``duplicates``: summed over the trials;
    ``outcome``: one of OUTCOMES; ``note``: a short remark for the table, the same in every call of the
    scenario; ``counts``: tallies that add up across calls like the figures (e.g. where kills landed:
    ``{"chunk kept": 7, "chunk rolled back": 3}``), shown after the note.
    """
    path = os.environ.get(REPORT_ENV)

    def report(scenario: str, *, trials: int, faults: int, rows_lost: int, duplicates: int,
               outcome: str, note: str = "", counts: dict[str, int] | None = None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        line = {"scenario": scenario, "trials": int(trials), "faults": int(faults),
                "rows_lost": int(rows_lost), "duplicates": int(duplicates), "outcome": outcome,
                "note": note, "counts": {k: int(v) for k, v in (counts or {}).items()},
                "test": request.node.nodeid}
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        assert rows_lost == 0, f"{scenario}: {rows_lost} row(s) lost"
        assert duplicates == 0, f"{scenario}: {duplicates} duplicate row(s)"

    return report


@pytest.fixture
def fault_rng(request) -> random.Random:
    """Random choices of a test (fault points, kill times): seeded by FLEXWRANGLE_FAULT_SEED and the test id."""
    return random.Random(f"{os.environ.get('FLEXWRANGLE_FAULT_SEED', '0')}:{request.node.nodeid}")


@pytest.fixture
def em_fault_db(tmp_path):
    """A factory: ``em_fault_db(name) -> (database path, wrangle parameters)`` for a fresh database."""
    def make(name: str = "faults") -> tuple[Path, dict]:
        db = make_db(tmp_path / f"{name}.duckdb", magellan_frames(n_pairs=EM_N, odd=EM_ODD))
        params = {**EM_PARAMS, "database": str(db), "model": "rule:same-or-junk",
                  "chunk_size": EM_CHUNK, "batch_size": EM_CHUNK}
        return db, params
    return make
