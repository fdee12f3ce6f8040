"""Run the wrangle flow in this process with the ``rule:`` fakes; used by the resume and
concurrency tests.

    python resume_driver.py '<json of wrangle keyword arguments>'

With FLEXWRANGLE_START_GATE=<path> in the environment it first writes ``<path>.ready-<pid>`` and
waits for ``<path>`` to exist, so that a test can start two flows at the same moment once both
processes have finished importing. ``scale_out`` in the arguments (true) runs ``wrangle_scale_out``
with subflow partitions instead.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))   # this checkout's packages, not an installed copy

import flow_testkit  # noqa: E402

from flows.scale_out import wrangle_scale_out  # noqa: E402
from flows.wrangle import wrangle  # noqa: E402


def wait_at_gate(gate: str, seconds: float = 300) -> None:
    Path(f"{gate}.ready-{os.getpid()}").touch()
    deadline = time.monotonic() + seconds
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            sys.exit(f"the start gate {gate} did not open within {seconds} s")
        time.sleep(0.02)


if __name__ == "__main__":
    flow_testkit.register()
    kwargs = json.loads(sys.argv[1])
    if os.environ.get("FLEXWRANGLE_START_GATE"):
        wait_at_gate(os.environ["FLEXWRANGLE_START_GATE"])
    flow = wrangle_scale_out if kwargs.pop("scale_out", False) else wrangle
    print(json.dumps(flow(**kwargs), default=str))
