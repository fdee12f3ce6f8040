"""Suite-wide settings. Tiny test models run fastest on one thread: OpenMP's spinning threads on a
busy 2-core machine make 32x32 matmuls 100x slower. Benchmarks keep the default thread count.

Prefect gets a home of its own in a temp dir (set before anything imports Prefect, so its logs and
settings stay out of the user's ~/.prefect) and one test server per session, shared by every
folder whose tests run flows (tests/flows, tests/faults).

Tests marked ``soak`` (the fault suite's many-trial variants) run only when ``-m`` names them
(``pytest -m soak tests/faults``); any other selection, ``make test`` included, leaves them out.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

_PREFECT_HOME = tempfile.mkdtemp(prefix="flexwrangle-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect test server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def pytest_collection_modifyitems(config, items):
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
