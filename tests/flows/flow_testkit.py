"""Test kit for the flow tests: small DuckDB inputs, and deterministic stand-ins for a
language model, registered as ``rule:<name>``.

They answer from the prompt's own text, so a misrouted answer is detectable. With
FLEXWRANGLE_FAKE_DELAY=<seconds> in the environment they sleep that long per call, so that a
run is slow enough to be killed midway (the model name, hence the run key, stays the same); with
FLEXWRANGLE_FAKE_HOLD=<path> every call waits until that file exists, so that a test decides when
a live run may go on.
``start_flow`` / ``run_at_once`` run flows in subprocesses (resume_driver.py), for tests that kill a
run or start two at the same moment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flows import llms
from wrangling_tasks import tables

EM_PARAMS = dict(task="entity-matching", table="em_pairs", left_table="em_left",
                 right_table="em_right")

_PAIR = re.compile(r" A is (.*)\. \w+ B is (.*)\. Are \w+ A and \w+ B the same\?$", re.S)


def same(prompt: str) -> str:
    """Entity matching: "Yes" when both records read the same, else "No"."""
    query = prompt.rsplit("\n\n", 1)[-1]
    m = _PAIR.search(query)
    if m is None:
        return "Not sure"
    return " Yes\n" if m.group(1) == m.group(2) else " No\n"


def same_or_junk(prompt: str) -> str:
    """Like ``same``, but an unparseable answer for records whose name contains "odd"."""
    query = prompt.rsplit("\n\n", 1)[-1]
    return "Maybe?" if "odd" in query else same(prompt)


RULES = {"same": same, "same-or-junk": same_or_junk}


class RuleLLM:
    """Answers each prompt with ``rule(prompt)``; sleeps ``delay`` seconds per call, and first waits
    for the file ``hold`` to exist when given."""

    def __init__(self, rule, delay: float = 0.0, hold: str | None = None) -> None:
        self.rule, self.delay, self.hold, self.calls = rule, delay, hold, 0

    def generate_text(self, prompts, max_new_tokens=8, stop="\n", **kw):
        self.calls += 1
        while self.hold and not os.path.exists(self.hold):
            time.sleep(0.02)
        if self.delay:
            time.sleep(self.delay)
        return [self.rule(p) for p in prompts]


def make(rest: str, policy) -> RuleLLM:
    return RuleLLM(RULES[rest], float(os.environ.get("FLEXWRANGLE_FAKE_DELAY", "0")),
                   os.environ.get("FLEXWRANGLE_FAKE_HOLD"))


def register() -> None:
    llms.register("rule", make)


def magellan_frames(n_pairs: int = 10, odd: tuple[int, ...] = ()) -> dict[str, pd.DataFrame]:
    """Two entity tables and labelled pairs (i, i): a match when i is even (identical rows).

    One extra entity on each side (id ``n_pairs``) feeds the demonstrations.
    """
    n = n_pairs
    names = [f"odd {i}" if i in odd else f"item {i}" for i in range(n)] + ["demo"]
    left = pd.DataFrame({"id": range(n + 1), "name": names, "city": ["paris"] * (n + 1)})
    right = pd.DataFrame({"id": range(n + 1),
                          "name": [x if i % 2 == 0 or i == n else f"other {i}"
                                   for i, x in enumerate(names)],
                          "city": ["paris"] * (n + 1)})
    pairs = pd.DataFrame({"ltable_id": range(n), "rtable_id": range(n),
                          "label": [int(i % 2 == 0) for i in range(n)]})
    demos = pd.DataFrame({"ltable_id": [n, n], "rtable_id": [n, 0], "label": [1, 0]})
    return {"em_left": left, "em_right": right, "em_pairs": pairs, "em_demos": demos}


def make_db(path: Path, frames: dict[str, pd.DataFrame]) -> Path:
    with tables.connect(path, create=True) as con:
        tables.replace_tables(con, frames)
    return path


# --- flows in subprocesses (kill, concurrency) -----------------------------------------------------
DRIVER = Path(__file__).with_name("resume_driver.py")


@dataclass
class Outcome:
    """How a flow run in a subprocess ended: exit code, its result (when it completed), its stderr."""

    returncode: int
    result: dict | None
    stderr: str


def start_flow(params: dict, env: dict, logs: Path) -> subprocess.Popen:
    """The wrangle flow (``scale_out: true``: wrangle_scale_out) in a subprocess of its own session;
    its output goes to files under ``logs`` (pipes could fill while the test waits on another process)."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(params)], env=env, stdout=o, stderr=e,
                                start_new_session=True)
    proc.logs = (out, err)
    return proc


def outcome(proc: subprocess.Popen, timeout: float = 300) -> Outcome:
    proc.wait(timeout)
    out, err = (p.read_text() for p in proc.logs)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return Outcome(proc.returncode, json.loads(lines[-1]) if proc.returncode == 0 and lines else None, err)


def start_at_once(runs: list[dict], env: dict, workdir: Path, timeout: float = 300) -> list[subprocess.Popen]:
    """Start one flow per parameter dict in its own process, and let them all call the flow at the
    same moment, once every one has finished its imports (resume_driver's start gate)."""
    gate = workdir / "gate"
    procs = [start_flow(params, {**env, "FLEXWRANGLE_START_GATE": str(gate)}, workdir / "logs") for params in runs]
    try:
        deadline = time.monotonic() + timeout
        while len(list(workdir.glob("gate.ready-*"))) < len(procs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a flow process ended or hung before the start gate: "
                                   + " | ".join(p.logs[1].read_text()[-2000:] for p in procs))
            time.sleep(0.05)
        gate.touch()
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is still running of ``procs`` (each in its own session)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
