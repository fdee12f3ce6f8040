"""Fixtures for flow tests: an isolated Prefect (home in a temp dir, one test server per
session), small DuckDB databases, and the ``rule:`` fake models."""

from __future__ import annotations

import atexit
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

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import flow_testkit  # noqa: E402,I001


flow_testkit.register()


atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect test server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def em_db(tmp_path) -> Path:
    return flow_testkit.make_db(tmp_path / "em.duckdb", flow_testkit.magellan_frames())


def _engine_model(path: Path, **shape) -> Path:
    import importlib.util
    kit = Path(__file__).resolve().parents[1] / "engine" / "enginekit.py"
    spec = importlib.util.spec_from_file_location("enginekit", kit)
    enginekit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(enginekit)
    enginekit._save_opt(path, max_position_embeddings=1024, **shape)
    return path


@pytest.fixture
def wider_engine_model(tmp_path):
    """A small random OPT whose weights (1 MiB in float32) outweigh the engine's working buffers, so a
    budget can leave no room for them in RAM whatever the search chooses."""
    return _engine_model(tmp_path / "opt-wider", hidden_size=64, ffn_dim=256, num_hidden_layers=4)


@pytest.fixture
def tiny_engine_model(tmp_path):
    """A tiny random OPT with a character tokenizer and room for a few-shot prompt."""
    return _engine_model(tmp_path / "opt-tiny")
