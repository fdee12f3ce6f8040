"""Byte accounting per tier: what each tier holds now and at its peak, against its budget.

Every allocation the engine makes on a tier (placed weights, KV cache, hidden states, pooled
working buffers, disk files) goes through a `MemoryTracker`, so that a policy that does not fit
fails with a message naming the tier, and so that measured peaks can be compared with the cost
model's predicted ones byte for byte.
"""
from __future__ import annotations

import threading


class MemoryBudgetError(MemoryError):
    """A tier would exceed its byte budget."""


class MemoryTracker:
    """Bytes held on one tier now and at the peak, against a capacity."""

    def __init__(self, tier: str, capacity: int):
        self.tier, self.capacity = tier, capacity
        self.current = self.peak = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int, what: str = "") -> None:
        with self._lock:
            if self.current + nbytes > self.capacity:
                raise MemoryBudgetError(
                    f"the {self.tier} tier is over its budget by {fmt_bytes(self.current + nbytes - self.capacity)} "
                    f"while allocating {fmt_bytes(nbytes)} for {what or 'a tensor'} (budget "
                    f"{fmt_bytes(self.capacity)}): lower this tier's percentages or batch size, or raise "
                    f"--{self.tier}-mem")
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def free(self, nbytes: int) -> None:
        with self._lock:
            self.current -= nbytes


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def parse_bytes(text) -> int:
    """'300MB', '1.5GiB', '4096' -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "B")
    for suffix, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(float(s))
