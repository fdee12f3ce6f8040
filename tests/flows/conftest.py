"""Fixtures for flow tests: an isolated Prefect (home in a temp dir, one test server per
session), small DuckDB databases, and the ``rule:`` fake models."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before Prefect is imported: keep its home, logs and settings out of the user's ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="flexwrangle-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import flow_fakes  # noqa: E402,I001

from wrangling_tasks import tables  # noqa: E402

flow_fakes.register()


@pytest.fixture(scope="session", autouse=True)
def _remove_prefect_home():
    yield
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect test server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


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


@pytest.fixture
def em_db(tmp_path) -> Path:
    return make_db(tmp_path / "em.duckdb", magellan_frames())


EM_PARAMS = dict(task="entity-matching", table="em_pairs", left_table="em_left",
                 right_table="em_right")
