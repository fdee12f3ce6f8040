"""One live attempt per logical run: an exclusive OS file lock per run key, beside the database.

Two attempts of the same run (a schedule firing while a manual run is going) would answer the same
rows twice and each claim the work. So an attempt holds ``<database>.run-<run_key>.lock`` from
before its first write until its run record is final, and a second attempt fails at once with an
error naming the live one (read from the lock file, so the message needs no database connection
while the live run may be writing).

The lock is ``flock``: the kernel releases it when its process ends, however it ends (SIGKILL, a
stopped worker, a crash), so a lock held means a live process and nothing has to expire. It
covers every process on the machine, and machines that share the database's folder on a file
system whose locks work -- which DuckDB's own one-writer lock already needs. The partitions of a
scaled-out run belong to their parent's attempt and take no lock.

Plain Python (no Prefect, no DuckDB).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["RunAlreadyRunning", "hold", "lock_path", "holder_info"]


class RunAlreadyRunning(RuntimeError):
    """Another live attempt of the same logical run (run key) holds its lock."""


def lock_path(database: str | os.PathLike, run_key: str) -> Path:
    return Path(f"{os.path.abspath(database)}.run-{run_key}.lock")


def holder_info(run_id: str, flow_run_name: str | None, started_at: Any) -> dict[str, Any]:
    """What the lock file says about its holder: enough to find and stop it."""
    if isinstance(started_at, datetime):
        started_at = started_at.isoformat(sep=" ", timespec="seconds")
    return {"run_id": run_id, "flow_run_name": flow_run_name, "host": socket.gethostname(),
            "pid": os.getpid(), "started_at": str(started_at)}


@contextlib.contextmanager
def hold(database: str | os.PathLike, run_key: str, info: dict[str, Any]) -> Iterator[Path]:
    """Hold run ``run_key``'s lock for the ``with`` block, or raise :class:`RunAlreadyRunning`."""
    path = lock_path(database, run_key)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunAlreadyRunning(_message(run_key, holder)) from None
        if _still_linked(fd, path):
            break
        os.close(fd)     # the previous holder removed this file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_key": run_key, **info}, default=str).encode(), 0)
        yield path
    finally:
        # Unlink before unlocking: a process that opened the old file meanwhile sees it unlinked once
        # it gets the lock, and retries on a fresh file, so no two processes ever hold "the" lock.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):   # the holder has locked but not yet written, or wrote garbage
        return {}


def _message(run_key: str, holder: dict[str, Any]) -> str:
    if holder.get("run_id"):
        who = (f"attempt {holder['run_id']} ({holder.get('flow_run_name') or 'no flow-run name'}), "
               f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')} UTC")
    else:
        who = "another process that is just starting"
    return (f"run {run_key} is already running: {who}. Two attempts of one run would answer the same rows "
            "twice. Wait for it to finish (a run started afterwards with the same parameters resumes where it "
            "stopped), stop it, or pass another `tag` to start a separate run.")
