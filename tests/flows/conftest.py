"""Fixtures for flow tests: small DuckDB databases and the ``rule:`` fake models (the isolated
Prefect home and the session's test server, ``prefect_api``, come from tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import flow_testkit  # noqa: E402,I001


flow_testkit.register()


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
