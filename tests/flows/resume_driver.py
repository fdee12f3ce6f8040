"""Run the wrangle flow in this process with the ``rule:`` fakes; used by test_flow_resume.

    python resume_driver.py '<json of wrangle keyword arguments>'
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import flow_testkit  # noqa: E402

from flows.wrangle import wrangle  # noqa: E402

if __name__ == "__main__":
    flow_testkit.register()
    print(json.dumps(wrangle(**json.loads(sys.argv[1])), default=str))
