"""The three tiers (compute device, CPU, disk): byte accounting, storage formats and disk files.

Everything a tier holds is raw bytes in rows: a `Format` turns a float tensor of n rows into a
uint8 tensor (n, row_bytes) and back. On the compute device, plain data is kept compute-ready
(float32 on CPU, with values rounded through the storage dtype so every tier yields identical
numbers); on CPU and disk it is kept in the storage dtype (float16 by default) or group-wise
quantized. Disk rows live in files under the offload directory, read and written with O_DIRECT
(page cache bypassed) at 4 KiB-aligned offsets (engine/disk.py).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch

from . import int8 as int8_format
from .compression import CompressionConfig, QuantizedTensor, compressed_nbytes, dequantize, padded_shape, quantize
from .disk import ALIGN, STAGING, DiskFile, aligned, process_folder, sweep_stale  # noqa: F401  (re-exported)

_FILE_NUMBERS = itertools.count(1)     # offload file names, process-wide


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


@dataclass(frozen=True)
class Format:
    """How float data is held on a tier: an element dtype, optional rounding, optional quantization."""

    dtype: torch.dtype                       # element dtype held (plain formats)
    round_to: torch.dtype | None = None      # values pass through this dtype first (storage precision)
    quant: CompressionConfig | None = None   # group-wise quantization instead of plain elements
    int8: bool = False                       # a 2-D weight as int8 rows with scales (engine/int8.py)

    def row_bytes(self, shape: tuple) -> int:
        if self.int8:
            return int8_format.nbytes(shape)
        if self.quant is not None:
            return compressed_nbytes(shape, self.quant)
        n = 1
        for s in shape:
            n *= s
        return n * _itemsize(self.dtype)

    def work_shape(self, shape: tuple) -> tuple:
        """Shape of the compute-form buffer `decode` fills without a copy (4-bit: whole groups)."""
        return tuple(shape) if self.quant is None else padded_shape(shape, self.quant)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, *shape) float -> uint8 (n, row_bytes)."""
        n = x.shape[0]
        if self.int8:
            return int8_format.encode(x)
        if self.quant is None:
            if self.round_to is not None and self.round_to != self.dtype:
                x = x.to(self.round_to)
            return x.to(self.dtype).contiguous().view(torch.uint8).reshape(n, -1)
        q = quantize(x, self._row_config())
        return torch.cat([p.reshape(n, -1).view(torch.uint8) for p in q.parts()], dim=1)

    def decode(self, raw: torch.Tensor, shape: tuple, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (n, row_bytes) -> (n, *shape) in `dtype`: into `out`'s memory when given (use the
        return value: a quantized format may hand back a transposed view of it), else a view when no
        conversion is needed."""
        n = raw.shape[0]
        if self.int8:
            vals = torch.stack([int8_format.dequantize(int8_format.unpack(r, shape), dtype) for r in raw])
            return out.copy_(vals) if out is not None else vals
        if self.quant is None:
            vals = raw.view(self.dtype).view(n, *shape)        # rows may be strided; elements contiguous
            if out is not None:
                return out.copy_(vals)
            return vals if self.dtype == dtype else vals.to(dtype)
        return dequantize(self.unpack(raw, shape, self._row_config()), dtype, out)

    def unpack(self, raw: torch.Tensor, shape: tuple, config: CompressionConfig | None = None):
        """uint8 (n, row_bytes) of a quantized format -> its parts (views when `raw` is contiguous);
        without `config` the rows are one tensor of `shape` (n must be 1). An int8 format gives the
        Int8Weight its one row holds."""
        if self.int8:
            return int8_format.unpack(raw, shape)
        n = raw.shape[0]
        groups = compressed_nbytes(shape, self.quant) // (self.quant.group_size * self.quant.num_bits // 8 + 4)
        packed_w = self.quant.group_size * self.quant.num_bits // 8
        sizes = [groups * packed_w, groups * 2, groups * 2]
        packed, step, minimum = torch.split(raw, sizes, dim=1)
        return QuantizedTensor(packed.contiguous().reshape(n * groups, packed_w),
                               step.contiguous().view(torch.float16).reshape(n * groups, 1),
                               minimum.contiguous().view(torch.float16).reshape(n * groups, 1),
                               (n, *shape) if config is not None else tuple(shape), config or self.quant)

    def _row_config(self) -> CompressionConfig:
        # the row dimension n comes first, so a group_dim counted from the front moves by one
        q = self.quant
        gd = q.group_dim + 1 if q.group_dim >= 0 else q.group_dim
        return CompressionConfig(q.num_bits, q.group_size, gd, q.symmetric)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nothing() -> None:
    pass


class Tiers:
    """The compute device, CPU and disk with their trackers; 'gpu' names the compute device."""

    def __init__(self, offload_dir: str | Path | None, gpu_mem=None, cpu_mem=None, disk_mem=None):
        self.compute_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.offload_dir = Path(offload_dir) if offload_dir else None
        if self.offload_dir is not None:
            sweep_stale(self.offload_dir)               # before measuring the free space it frees
        avail = psutil.virtual_memory().available
        if self.compute_device.type == "cuda":
            gpu_cap = torch.cuda.get_device_properties(0).total_memory
        else:
            gpu_cap = avail
        disk_cap = (psutil.disk_usage(str(self.offload_dir)).free
                    if self.offload_dir and self.offload_dir.exists() else 1 << 62)
        self.trackers = {
            "gpu": MemoryTracker("gpu", parse_bytes(gpu_mem) if gpu_mem is not None else gpu_cap),
            "cpu": MemoryTracker("cpu", parse_bytes(cpu_mem) if cpu_mem is not None else avail),
            "disk": MemoryTracker("disk", parse_bytes(disk_mem) if disk_mem is not None else disk_cap),
        }

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float16 if self.compute_device.type == "cuda" else torch.float32

    def device(self, tier: str) -> torch.device:
        return self.compute_device if tier == "gpu" else torch.device("cpu")

    def new_file(self, stem: str, row_bytes: int, rows: int) -> DiskFile:
        if self.offload_dir is None:
            raise ValueError("this policy puts data on disk: pass offload_dir (--offload-dir) to a folder "
                             "on a local disk with room for it")
        with process_folder(self.offload_dir) as folder:     # the name is unique: the folder is this process's
            return DiskFile(folder / f"{next(_FILE_NUMBERS)}-{stem}.bin", row_bytes, rows, self.trackers["disk"],
                            folder=self.offload_dir)

    def peaks(self) -> dict[str, int]:
        return {name: t.peak for name, t in self.trackers.items()}


class BufferPool:
    """Reusable compute-form buffers keyed by (shape, dtype, device): weights_now / weights_next and
    loaded caches reuse the same memory every layer and step instead of faulting in new pages. Held
    buffers count on the compute device's tracker for as long as the pool keeps them."""

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
        nbytes = _numel(shape) * _itemsize(dtype)
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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TierArray:
    """`rows` rows of one logical shape on one tier, in one Format: the unit of placement."""

    def __init__(self, tiers: Tiers, tier: str, fmt: Format, shape: tuple, rows: int, what: str,
                 span: tuple[DiskFile, int] | None = None):
        """`span` = (file, byte offset): on disk, live inside a file shared with other arrays (it must
        have room for `rows` aligned rows from that offset); else the array gets a file of its own."""
        self.tiers, self.tier, self.fmt, self.shape, self.rows = tiers, tier, fmt, tuple(shape), rows
        self.row_bytes = fmt.row_bytes(self.shape)
        self.what = what
        self.base, self.stride = 0, aligned(self.row_bytes)     # on disk: row 0's byte offset, row step
        if tier == "disk" and span is not None:
            self.file, self.base = span[0].share(), span[1]
            self.data = None
        elif tier == "disk":
            self.file = tiers.new_file(what.replace(" ", "_").replace("/", "_"), self.row_bytes, rows)
            self.data = None
        else:
            tiers.trackers[tier].alloc(self.row_bytes * rows, what)
            self.data = torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=tiers.device(tier))
            self.file = None

    @property
    def nbytes(self) -> int:
        return self.stride * self.rows if self.file else self.row_bytes * self.rows

    def write(self, start: int, x: torch.Tensor) -> None:
        """Store float rows x (n, *shape) at rows [start, start + n)."""
        raw = self.fmt.encode(x)
        if self.file is not None:
            self.file.write_rows(start, raw.cpu(), self.base, self.stride)
        else:
            self.data[start: start + x.shape[0]] = raw.to(self.data.device, non_blocking=True)

    def _read_rows(self, start: int, n: int):
        return self.file.read_rows(start, n, self.base, self.stride, self.row_bytes)

    def read(self, start: int, n: int, device: torch.device, dtype: torch.dtype,
             out: torch.Tensor | None = None, raw: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, start + n) as (n, *shape) in dtype on device; into `out` when given.

        Without `out` the result may be a view of this array's memory (plain data already in the
        wanted dtype and device), never of a disk staging buffer. `raw`: those rows' bytes, already
        read by the caller (a span of a shared read); decoded from there."""
        staging = None
        if raw is None and self.file is not None:
            raw, staging = self._read_rows(start, n)
        elif raw is None:
            raw = self.data[start: start + n]
        try:
            if raw.device != device and self.fmt.quant is not None:
                raw = raw.to(device, non_blocking=True)       # move compressed, dequantize on device
            elif raw.device != device:
                vals = self.fmt.decode(raw, self.shape, self.fmt.dtype)
                return out.copy_(vals) if out is not None else vals.to(device, dtype)
            if out is None and staging is not None and self.fmt.quant is None and self.fmt.dtype == dtype:
                return self.fmt.decode(raw, self.shape, dtype).clone()
            return self.fmt.decode(raw, self.shape, dtype, out)
        finally:
            if staging is not None:
                del raw
                STAGING.put(staging)

    def read_bytes(self, raw: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
        """Row 0's bytes (1, row_bytes) and a function to call once they are used: `raw` when the
        caller already read them (a shared read it keeps alive), else a disk staging buffer (held
        until that call) or a view of this array's memory."""
        if raw is not None:
            return raw, _nothing
        if self.file is not None:
            raw, staging = self._read_rows(0, 1)
            return raw, lambda: STAGING.put(staging)
        return self.data[0:1], _nothing

    def read_quantized(self, device: torch.device, out: torch.Tensor | None = None,
                       raw: torch.Tensor | None = None):
        """Row 0 of a quantized (or int8) array as its packed parts on `device`, not dequantized, and a function
        to call once they are used. With `out` (a uint8 buffer of row_bytes) the bytes are copied into
        it; without, the parts may view a disk staging buffer (held until that call) or this array.
        `raw`: row 0's bytes already read by the caller, who keeps them alive (a shared read)."""
        release = _nothing
        if raw is not None or self.file is not None:
            raw, release = self.read_bytes(raw)
            if out is not None:
                out.copy_(raw[0])
                release()
                release = _nothing
            else:
                out = raw[0]
        elif self.data.device != device or out is not None:
            out = out.copy_(self.data[0]) if out is not None else self.data[0].to(device)
        else:
            out = self.data[0]
        return self.fmt.unpack(out.view(1, -1), self.shape), release

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        elif self.data is not None:
            self.tiers.trackers[self.tier].free(self.row_bytes * self.rows)
        self.data = self.file = None
