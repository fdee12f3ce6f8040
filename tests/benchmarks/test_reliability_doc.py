"""benchmarks/reliability.py: fault_report lines add up per scenario, and the page lists what failed."""
import json

from benchmarks import reliability


def test_lines_of_a_scenario_add_up_and_failures_are_listed(tmp_path):
    report = tmp_path / "report.jsonl"
    lines = [dict(scenario="kill", trials=2, faults=2, rows_lost=0, duplicates=0, outcome="recovered",
                  note="a", counts={"kept": 1}, test="tests/faults/test_a.py::t[fast]"),
             dict(scenario="lock", trials=1, faults=1, rows_lost=0, duplicates=0, outcome="clear error",
                  note="", test="tests/faults/test_b.py::t"),
             dict(scenario="kill", trials=40, faults=39, rows_lost=1, duplicates=0, outcome="recovered",
                  note="a", counts={"kept": 30, "rolled back": 9}, test="tests/faults/test_a.py::t[soak]")]
    report.write_text("".join(json.dumps(x) + "\n" for x in lines))

    rows = reliability.scenarios(report)
    page = reliability.markdown(rows, {"passed": 2, "failed": 1}, ["`t[soak]`: 1 row(s) lost"], "cmd", 60.0,
                                ["tests/faults/test_c.py"])

    assert [r["scenario"] for r in rows] == ["kill", "lock"]
    assert (rows[0]["trials"], rows[0]["faults"], rows[0]["rows_lost"], rows[0]["notes"]) == (42, 41, 1, ["a"])
    assert "| kill | `test_a.py` | 42 | 41 | 1 | 0 | recovered | a: kept 31, rolled back 9 |" in page
    assert "1 failed" in page and "`t[soak]`: 1 row(s) lost" in page and "`tests/faults/test_c.py`" in page
