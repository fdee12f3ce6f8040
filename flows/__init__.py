"""Prefect flows over the wrangling tasks (see docs/flows.md)."""
import os

# `wrangle(...)` called as a plain function starts a temporary Prefect server, which gives up after
# 20 s by default; a cold start on a small machine can take longer than that.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
