"""The three tiers (compute device, CPU, disk) and the arrays placed on them.

`Tiers` holds one byte tracker per tier ("gpu" names the compute device: CUDA when present, else
the CPU) and makes the disk tier's files. A `TierArray` is the unit of placement: rows of one
logical shape on one tier, held as raw bytes in one `Format` (engine/formats.py); disk rows live
in O_DIRECT files under the offload directory (engine/disk.py).

The tracker, format, pool and disk-file names are re-exported here too, so that callers of
`engine.tiers` (the hardware probe, flows/params.py, tests) need not know which file holds which.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import psutil
import torch

from .accounting import MemoryBudgetError, MemoryTracker, fmt_bytes, parse_bytes  # noqa: F401  (re-exported)
from .disk import ALIGN, STAGING, DiskFile, aligned, process_folder, sweep_stale  # noqa: F401  (re-exported)
from .formats import Format, compute_dtype  # noqa: F401  (re-exported)
from .pools import BufferPool  # noqa: F401  (re-exported)

_FILE_NUMBERS = itertools.count(1)     # offload file names, process-wide


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
        return compute_dtype(self.compute_device.type)

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
