"""Reusable working buffers on the compute device.

Loading a layer's weights, or a micro-batch's KV cache, off the compute device (or out of a
compressed format) fills a float buffer the model then computes with. The pool lends those
buffers by (shape, dtype, device) and takes them back, so that weights_now / weights_next and
the loaded caches reuse the same memory every layer and step instead of faulting in new pages.
"""
from __future__ import annotations

import ctypes
import math
import threading

import torch

from .accounting import MemoryBudgetError, MemoryTracker


class BufferPool:
    """Buffers lent and taken back by (shape, dtype, device). Every buffer the pool made counts on
    the compute device's tracker until `trim` drops it, lent or idle: the tracker's peak is then
    what the pool ever held, which is what the cost model predicts."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple, dtype: torch.dtype, device: torch.device, what: str = "") -> torch.Tensor:
        key = (tuple(shape), dtype, str(device))
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            self.tracker.alloc(nbytes, what)
        except MemoryBudgetError:
            self.trim()                       # drop idle buffers of other shapes, then try once more
            self.tracker.alloc(nbytes, what)
        return torch.empty(shape, dtype=dtype, device=device)

    def put(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(t.shape), t.dtype, str(t.device)), []).append(t)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def trim(self) -> None:
        """Drop the idle buffers and hand the memory they held back to the OS."""
        with self._lock:
            for free in self._free.values():
                for t in free:
                    self.tracker.free(t.numel() * t.element_size())
            self._free.clear()
        _malloc_trim()


def _malloc_trim() -> None:
    """Return free heap pages to the OS. Buffers of 32 MB and more are mmapped and unmapped when freed
    (weights.unmapped_on_free), but smaller ones (a 2048 x 2048 float32 working copy: 16 MB) come from
    glibc's heap, which keeps freed pages in RSS until asked. No-op off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
