"""The fault-injection suite's soak (every file in tests/faults, many trials each) -> docs/reliability.md.

Runs every test of tests/faults, the soak variants included (``pytest -m "soak or not soak"``), in a
fresh process with ``FLEXWRANGLE_FAULT_REPORT`` set: every
scenario's test appends its figures through the ``fault_report`` fixture (tests/faults/conftest.py),
and this script sums them per scenario into one table row: trials, faults injected, rows lost,
duplicates, outcome. Tests that failed, and files of the suite that reported nothing, are listed under
the table, so a scenario without a row is visible.

    .venv/bin/python benchmarks/reliability.py            # the soak (~10-15 min on 2 busy cores), writes the doc
    .venv/bin/python benchmarks/reliability.py --quick    # the default trials (make test's), prints only
    .venv/bin/python benchmarks/reliability.py --quick --write-doc
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._doc import engine_commit, load_now, machine_line, md_table  # noqa: E402

DOC = REPO / "docs" / "reliability.md"
SUITE = "tests/faults"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "False"}

INTRO = """\
# Reliability under faults

What the flows do when things go wrong, measured by the fault-injection suite (`tests/faults`): each
scenario injects its fault many times (`pytest -m "soak or not soak" tests/faults`; `make test` runs a
few trials of each) and counts, over all trials, the rows the run lost and the rows it wrote twice (targets: 0 and 0),
and how the run ended:

- **recovered**: the run completed with every row, by itself (a retry) or when started again with the
  same parameters (resume);
- **clear error**: it stopped with an error that names the problem and what to do, and lost nothing;
- **unaffected**: the input or fault changed nothing (the run completed as it would without it).

*Faults injected* counts faults that met a running flow (a kill that came after a run had ended is a
trial, not a fault). A scenario's test fails when any trial loses or duplicates a row, leaves a chunk's
results without its quarantine rows (or the reverse), or ends otherwise than its row says.

Every file of the suite reports through the `fault_report` fixture (tests/faults/conftest.py) and takes
its trial counts from `fault_kit.trials(fast=..., soak=...)`; `benchmarks/reliability.py` runs the soak
and rewrites this page.
"""


def run_suite(marker: str, report: Path, junit: Path, extra: list[str]) -> tuple[int, float]:
    env = {**os.environ, **ENV, "FLEXWRANGLE_FAULT_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, SUITE,
           f"--junitxml={junit}", *extra]
    start = time.monotonic()
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    return code, time.monotonic() - start


def scenarios(report: Path) -> list[dict]:
    """The report's lines summed per scenario, in first-reported order."""
    rows: dict[str, dict] = {}
    for line in report.read_text(encoding="utf-8").splitlines() if report.exists() else []:
        r = json.loads(line)
        s = rows.setdefault(r["scenario"], {"scenario": r["scenario"], "trials": 0, "faults": 0, "rows_lost": 0,
                                            "duplicates": 0, "outcomes": [], "notes": [], "files": [],
                                            "counts": defaultdict(int)})
        for k in ("trials", "faults", "rows_lost", "duplicates"):
            s[k] += r[k]
        for k, v in r.get("counts", {}).items():
            s["counts"][k] += v
        for key, value in (("outcomes", r["outcome"]), ("notes", r["note"]), ("files", r["test"].split("::")[0])):
            if value and value not in s[key]:
                s[key].append(value)
    return list(rows.values())


def test_outcomes(junit: Path) -> tuple[dict[str, int], list[str]]:
    """Passed / failed / skipped counts, and one line per failed test."""
    counts, failed = defaultdict(int), []
    if not junit.exists():
        return counts, failed
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            message = (bad.get("message") or "").strip().split("\n")[0][:200]
            failed.append(f"`{case.get('classname')}::{case.get('name')}`: {message}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def note(row: dict) -> str:
    """The scenario's notes, then its counts: 'kills landed: before the first commit 16, ...'."""
    counts = ", ".join(f"{k} {v}" for k, v in row["counts"].items())
    text = "; ".join(row["notes"])
    return f"{text}: {counts}" if text and counts else text or counts


def descriptions() -> dict[str, str]:
    """Each file of the suite -> the first paragraph of its docstring (what it injects and checks)."""
    out = {}
    for path in sorted((REPO / SUITE).glob("test_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        out[path.name] = " ".join(doc.split("\n\n")[0].split())
    return out


def markdown(rows: list[dict], counts: dict[str, int], failed: list[str], command: str, seconds: float,
             silent_files: list[str], files: dict[str, str] | None = None) -> str:
    table = md_table(
        ["scenario", "test file", "trials", "faults injected", "rows lost", "duplicates", "outcome", "note"],
        [[r["scenario"].replace("|", "/"), ", ".join(f"`{Path(f).name}`" for f in r["files"]), r["trials"],
          r["faults"], r["rows_lost"], r["duplicates"], " / ".join(r["outcomes"]),
          note(r).replace("|", "/")] for r in rows])
    lines = [INTRO, "## Latest run", "",
             f"{machine_line()}; load {load_now()} at the end; commit {engine_commit()}.",
             f"Command: `{command}` ({seconds / 60:.1f} min; tests: {counts.get('passed', 0)} passed, "
             f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped or expected to fail).", "",
             table, ""]
    if failed:
        lines += ["Failed tests (their scenarios' rows above are missing or partial):", ""]
        lines += [f"- {f}" for f in failed] + [""]
    if silent_files:
        lines += ["Files of the suite that reported no scenario (not yet using `fault_report`): "
                  + ", ".join(f"`{f}`" for f in silent_files) + ".", ""]
    if files:
        lines += ["## What each file injects", ""] + [f"- `{name}`: {text}" for name, text in files.items()] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the default trials instead of the soak; prints only")
    ap.add_argument("--write-doc", action="store_true", help="with --quick: write docs/reliability.md anyway")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k sigkill")
    args = ap.parse_args(argv)

    marker = "not soak" if args.quick else "soak or not soak"   # the soak, and the scenarios tested once
    with tempfile.TemporaryDirectory(prefix="flexwrangle-reliability-") as tmp:
        report, junit = Path(tmp) / "report.jsonl", Path(tmp) / "junit.xml"
        code, seconds = run_suite(marker, report, junit, args.pytest_args)
        rows = scenarios(report)
        counts, failed = test_outcomes(junit)
    reported = {f for r in rows for f in r["files"]}
    silent = [] if args.pytest_args else sorted(
        str(p.relative_to(REPO)) for p in (REPO / SUITE).glob("test_*.py") if str(p.relative_to(REPO)) not in reported)
    command = shlex.join(["python", "benchmarks/reliability.py", *(["--quick"] if args.quick else []),
                          *(["--", *args.pytest_args] if args.pytest_args else [])])
    text = markdown(rows, counts, failed, command, seconds, silent, descriptions())
    print(text)
    if args.write_doc or not args.quick:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
