"""Disk-tier files: rows of fixed size at 4 KiB-aligned strides, read and written with O_DIRECT
(page cache bypassed), and the page-aligned staging buffers those reads and writes go through."""
from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref
from pathlib import Path

import torch

ALIGN = 4096


class _Staging:
    """Page-aligned host buffers for O_DIRECT, reused by size (a fresh mmap per read costs page faults)."""

    def __init__(self, keep_per_size: int = 4):
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self.keep = keep_per_size

    def get(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return mmap.mmap(-1, nbytes)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < self.keep:
                free.append(buf)


STAGING = _Staging()


class DiskFile:
    """A file of fixed-size rows at 4 KiB-aligned strides, read and written with O_DIRECT.

    Several TierArrays may share one file, each at its own aligned byte offset (`base`), so that a
    layer's disk-homed weights come back in one read (`LayerWeights.load`); `share` counts the users
    and the last `close` deletes the file."""

    def __init__(self, path: Path, row_bytes: int, rows: int, tracker: MemoryTracker):
        self.path, self.row_bytes, self.rows = Path(path), row_bytes, rows
        self.stride = aligned(row_bytes)
        self.tracker = tracker
        self.users = 1
        tracker.alloc(self.stride * rows, f"disk file {self.path.name}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL     # never open (and clobber) a file someone else has
        try:
            try:
                self.fd = os.open(self.path, flags | getattr(os, "O_DIRECT", 0), 0o600)
                self.direct = hasattr(os, "O_DIRECT")
            except FileExistsError:
                raise
            except OSError:  # e.g. tmpfs: buffered I/O, pages dropped after use
                self.fd = os.open(self.path, flags, 0o600)
                self.direct = False
        except BaseException:
            tracker.free(self.stride * rows)
            raise
        os.ftruncate(self.fd, self.stride * rows)
        # delete the file even when its owner is dropped without close() (e.g. an exception mid-run)
        self._finalizer = weakref.finalize(self, _remove_file, self.fd, self.path)

    def share(self) -> "DiskFile":
        self.users += 1
        return self

    def write_rows(self, start: int, raw: torch.Tensor, base: int = 0, stride: int | None = None) -> None:
        """Rows raw (n, row_bytes) at rows [start, start + n) of a span that begins at byte `base`
        and steps `stride` bytes a row (default: the file's own rows)."""
        n, stride = raw.shape[0], stride or self.stride
        buf = STAGING.get(n * stride)
        try:
            view = torch.frombuffer(buf, dtype=torch.uint8).view(n, stride)
            view[:, : raw.shape[1]] = raw
            _full(os.pwrite, self.fd, buf, base + start * stride)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left for the offload file {self.path} ({n * stride} bytes "
                              "more): free space there, pass another offload_dir, or lower disk_mem so the "
                              "policy keeps less on disk") from exc
            raise
        finally:
            del view
            STAGING.put(buf)
        if not self.direct:
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, base + start * stride, n * stride, os.POSIX_FADV_DONTNEED)

    def read_rows(self, start: int, n: int, base: int = 0, stride: int | None = None,
                  row_bytes: int | None = None) -> tuple[torch.Tensor, mmap.mmap]:
        """uint8 (n, row_bytes) as a view into a staging buffer, and the buffer (give it back with
        STAGING.put once the view is no longer used). `base` and `stride` as in write_rows."""
        stride, row_bytes = stride or self.stride, row_bytes or self.row_bytes
        buf = STAGING.get(n * stride)
        offset = base + start * stride
        got = os.preadv(self.fd, [buf], offset)
        if got != n * stride:
            STAGING.put(buf)
            raise IOError(f"{self.path}: short read ({got} of {n * stride} bytes); the offload file "
                          "was truncated or removed while in use")
        if not self.direct:
            os.posix_fadvise(self.fd, offset, n * stride, os.POSIX_FADV_DONTNEED)
        return torch.frombuffer(buf, dtype=torch.uint8).view(n, stride)[:, :row_bytes], buf

    def close(self) -> None:
        self.users -= 1
        if self.fd >= 0 and self.users <= 0:
            self._finalizer()
            self.fd = -1
            self.tracker.free(self.stride * self.rows)


def aligned(nbytes: int) -> int:
    """nbytes rounded up to the O_DIRECT alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def _remove_file(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)


def _full(write, fd, buf, offset):
    mv, done = memoryview(buf), 0
    while done < len(mv):
        done += write(fd, mv[done:], offset + done)
