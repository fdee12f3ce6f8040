"""Test kit for the flow tests: small DuckDB inputs, and deterministic stand-ins for a
language model, registered as ``rule:<name>``.

They answer from the prompt's own text, so a misrouted answer is detectable. With
FLEXWRANGLE_FAKE_DELAY=<seconds> in the environment they sleep that long per call, so that a
run is slow enough to be killed midway (the model name, hence the run key, stays the same).
"""

from __future__ import annotations

import os
import re
import time
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
    """Answers each prompt with ``rule(prompt)``; sleeps ``delay`` seconds per call."""

    def __init__(self, rule, delay: float = 0.0) -> None:
        self.rule, self.delay, self.calls = rule, delay, 0

    def generate_text(self, prompts, max_new_tokens=8, stop="\n", **kw):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return [self.rule(p) for p in prompts]


def make(rest: str, policy) -> RuleLLM:
    return RuleLLM(RULES[rest], float(os.environ.get("FLEXWRANGLE_FAKE_DELAY", "0")))


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
