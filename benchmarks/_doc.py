"""docs/benchmarks.md as named sections, each rewritten by the script that measures it.

    from benchmarks._doc import write_section
    write_section("smollm2_vs_transformers", markdown)

The file starts with a machine header (CPU model, cores, RAM, library versions, date of the last
write); every section sits between `<!-- BEGIN name -->` and `<!-- END name -->` and is replaced in
place, so one script's rerun keeps every other script's results.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
HEADER = "header"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int:
    import psutil
    return psutil.virtual_memory().total


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # a missing optional library is reported, not fatal
            out[name] = "not installed"
    return out


def load_now() -> str:
    """The 1/5/15-minute load averages, e.g. '4.81 / 4.54 / 2.72'."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def engine_commit() -> str:
    """HEAD's short hash, marked '+dirty' when engine/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty engine/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line() -> str:
    """This machine and library set in one line; every section starts with it."""
    v = versions()
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; RAM {ram_bytes() / 2**30:.1f} GiB; no GPU; "
            f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
            f"accelerate {v['accelerate']}")


def machine_header() -> str:
    return "\n".join([
        "# Benchmarks",
        "",
        "Every number below was measured by the script named in its section (see benchmarks/README.md) "
        "on the machine named in its first line; each section states the machine load while it ran. "
        "Other engineers share the machine, so absolute rates move with the load; ratios inside a "
        "section come from the same run. Sections were measured on more than one CPU (each names its "
        "own in its first line): compare absolute numbers only between sections from the same CPU.",
        "",
        f"- now: {machine_line()}",
        f"- last section written: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ])


def _block(name: str, body: str) -> str:
    return f"<!-- BEGIN {name} -->\n{body.strip()}\n<!-- END {name} -->"


def read_sections(text: str) -> list[tuple[str, str]]:
    """(name, body) for every section in document order."""
    pat = re.compile(r"<!-- BEGIN (\S+) -->\n(.*?)\n?<!-- END \1 -->", re.S)
    return [(m.group(1), m.group(2)) for m in pat.finditer(text)]


def write_section(name: str, markdown: str, doc: Path = DOC) -> Path:
    """Replace (or append) section `name` in docs/benchmarks.md and refresh the machine header."""
    if name == HEADER:
        raise ValueError(f"section name {HEADER!r} is reserved for the machine header")
    doc.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / "flexwrangle-benchmarks-doc.lock"
    with open(lock_path, "w") as lock:   # two scripts may finish at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _write_locked(doc, name, markdown)


def _write_locked(doc: Path, name: str, markdown: str) -> Path:
    sections = read_sections(doc.read_text()) if doc.exists() else []
    bodies = dict(sections)
    order = [n for n, _ in sections if n != HEADER]
    if name not in order:
        order.append(name)
    bodies[name] = _with_machine(markdown)
    parts = [_block(HEADER, machine_header())] + [_block(n, bodies[n]) for n in order]
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts) + "\n")
    os.replace(tmp, doc)
    return doc


def _with_machine(markdown: str) -> str:
    """The section with the machine line after its title (or first, without a title)."""
    title, sep, rest = markdown.strip().partition("\n")
    if title.startswith("#") and sep:
        return f"{title}\n\n{machine_line()}\n{rest}"
    return f"{machine_line()}\n\n{markdown.strip()}"


def publish(name: str, markdown: str, write: bool) -> None:
    """Print a section's markdown and, with `write`, put it into docs/benchmarks.md."""
    print(markdown)
    if write:
        print(f"wrote {write_section(name, markdown)}")


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats keep the caller's formatting (pass strings)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
