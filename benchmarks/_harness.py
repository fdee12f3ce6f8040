"""Shared measurement helpers: one fresh subprocess per system (with its peak RSS), and small probes.

Peak RSS comes from `os.wait4` on that one child (the kernel's high-water mark, so peaks never leak
between runs) plus /proc polling every 0.2 s that splits it into anonymous memory (heap, tensors)
and file-backed pages (memory-mapped checkpoints), which the kernel can drop under pressure.
The probes measure, in the benchmark's own run, the two rates the roofline floor needs: float32
matmul FLOP/s and O_DIRECT sequential read bandwidth.
"""
from __future__ import annotations

import json
import mmap
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV_EXTRA: dict[str, str] = {}     # set by a script's flags (e.g. OMP_WAIT_POLICY), for every system alike


def omp_passive(on: bool) -> str:
    """With `on`, every measured process gets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep
    instead of spinning; on this shared 2-core machine spinning threads of a 2-thread pool wait for
    each other at every small op). Returns a phrase for the report."""
    if on:
        ENV_EXTRA["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"     # this process's probes too (read when torch loads)
        return "OMP_WAIT_POLICY=PASSIVE for every system and probe"
    ENV_EXTRA.pop("OMP_WAIT_POLICY", None)
    return f"OpenMP defaults (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')})"


def bench_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(ENV_EXTRA)
    return env


def _read_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], log: Path | None = None, timeout: float | None = None,
                 rss_cap: int | None = None) -> dict:
    """Run `cmd` in a fresh process; wall time, exit code and peak memory of that process.

    peak_rss_bytes is the kernel's ru_maxrss of the child (via wait4); peak_anon_bytes and
    peak_file_bytes are the largest RssAnon / RssFile seen by polling. With `rss_cap`, the child
    is killed as soon as its RSS exceeds the cap (`over_cap` True): a run that cannot fit the
    memory budget is stopped instead of finished.
    """
    log = Path(log) if log else None
    out = open(log, "w") if log else subprocess.DEVNULL
    if log:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=bench_env(), cwd=REPO)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()
    over = threading.Event()

    def poll():
        while not stop.is_set():
            for k, v in _read_status(p.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            if rss_cap is not None and peaks["VmRSS"] > rss_cap and not over.is_set():
                over.set()
                p.kill()
            stop.wait(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    deadline = None if timeout is None else t0 + timeout
    status = usage = None
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            p.kill()
            _, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.1)
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if log:
        out.close()
    return {"cmd": cmd, "rc": p.returncode, "wall_s": wall, "timed_out": bool(deadline and wall > timeout),
            "over_cap": over.is_set(),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_bytes": peaks["RssFile"], "log": str(log) if log else None}


def run_json(cmd: list[str], json_path: Path, log: Path | None = None, timeout: float | None = None,
             rss_cap: int | None = None) -> dict:
    """run_measured, then merge the JSON the command wrote (its own timings) into the result."""
    json_path = Path(json_path)
    json_path.unlink(missing_ok=True)
    r = run_measured(cmd, log=log, timeout=timeout, rss_cap=rss_cap)
    if r["rc"] == 0 and json_path.exists():
        r["result"] = json.loads(json_path.read_text())
    elif r["over_cap"]:
        r["error"] = f"killed: RSS passed the {gib(rss_cap)} GiB cap after {r['wall_s']:.0f} s"
    else:
        tail = Path(log).read_text()[-2000:] if log and Path(log).exists() else ""
        r["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {r['rc']}"
    return r


# ---- probes -------------------------------------------------------------------------------------
def matmul_rate(n: int = 2048, seconds: float = 2.0) -> float:
    """float32 FLOP/s of an n x n x n matmul on this process's torch threads (best of the runs)."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def direct_read_bandwidth(path: Path, nbytes: int = 512 << 20, chunk: int = 16 << 20) -> float:
    """O_DIRECT sequential read bytes/s from an existing file (page cache bypassed)."""
    size = os.path.getsize(path)
    nbytes = min(nbytes, size - size % chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    try:
        t = time.perf_counter()
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [buf], done)
            if got <= 0:
                break
            done += got
        return done / (time.perf_counter() - t)
    finally:
        os.close(fd)
        buf.close()


def probe(disk_file: Path, quick: bool = False) -> dict:
    """The two roofline rates, measured now."""
    mm = matmul_rate(seconds=1.0 if quick else 2.0)
    bw = direct_read_bandwidth(disk_file, nbytes=(256 if quick else 768) << 20)
    return {"matmul_flops": mm, "disk_read_bytes_per_s": bw, "load": os.getloadavg()}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"
