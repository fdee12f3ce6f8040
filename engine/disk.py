"""Disk-tier files: rows of fixed size at 4 KiB-aligned strides, read and written with O_DIRECT
(page cache bypassed), and the page-aligned staging buffers those reads and writes go through.

Offload files leave nothing behind, even when the process is killed: each is created (O_EXCL) in
this process's private folder under the offload directory (`process_folder`, mode 0700), unlinked
at once (reads and writes go on through the open descriptor; the kernel frees the space when it is
closed, or when the process dies), and its bytes reserved with posix_fallocate, so that a disk too
small fails at creation, before any compute, with an error naming the folder and the bytes. The
folder only exists while a file is being made; one left by a process killed in that moment is
removed by the next engine that starts there (`sweep_stale`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

if TYPE_CHECKING:
    from .accounting import MemoryTracker

log = logging.getLogger(__name__)

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

    The file is unlinked as soon as it is open and its bytes are reserved (see the module's
    docstring); `folder` is where the error messages say the space is wanted (default: the path's).
    Several TierArrays may share one file, each at its own aligned byte offset (`base`), so that a
    layer's disk-homed weights come back in one read (`LayerWeights.load`); `share` counts the users
    and the last `close` closes it."""

    def __init__(self, path: Path, row_bytes: int, rows: int, tracker: MemoryTracker,
                 folder: Path | None = None):
        self.path, self.row_bytes, self.rows = Path(path), row_bytes, rows
        self.folder = Path(folder) if folder is not None else self.path.parent
        self.stride = aligned(row_bytes)
        self.tracker = tracker
        self.users = 1
        tracker.alloc(self.stride * rows, f"disk file {self.path.name}")
        try:
            # never open (and clobber) a file someone else has; O_DIRECT is asked for afterwards, because
            # a file system that refuses it fails the open only after creating the file
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except BaseException:
            tracker.free(self.stride * rows)
            raise
        # closes the descriptor even when its owner is dropped without close() (e.g. an exception mid-run)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        try:
            self.path.unlink()
            self.direct = _set_direct(self.fd)     # else buffered I/O, pages dropped after use
            self._reserve(self.stride * rows)
        except BaseException:
            self.close()
            raise

    def _reserve(self, nbytes: int) -> None:
        """Allocate the file's blocks now, so that a disk without room fails here and not mid-run."""
        try:
            os.posix_fallocate(self.fd, 0, nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, self._no_space(nbytes)) from exc
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # no fallocate on this file system: a sparse file, whose blocks are taken as rows are written
            os.ftruncate(self.fd, nbytes)

    def _no_space(self, nbytes: int) -> str:
        from .accounting import fmt_bytes
        free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
        return (f"no space left in the offload folder {self.folder}: the offload file {self.path.name} needs "
                f"{nbytes} bytes ({fmt_bytes(nbytes)}) and {fmt_bytes(free)} are free there; free space there, "
                "pass another offload_dir, or lower disk_mem so the policy keeps less on disk")

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
            if exc.errno == errno.ENOSPC:     # a sparse file (no fallocate), or a copy-on-write file system
                raise OSError(errno.ENOSPC, self._no_space(n * stride)) from exc
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
            raise IOError(f"offload file {self.path.name} in {self.folder}: short read ({got} of {n * stride} "
                          f"bytes at byte {offset}); the file was truncated while in use, which only this "
                          "process (or root, through /proc/<pid>/fd) can do: run again")
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


def _set_direct(fd: int) -> bool:
    """Switch `fd` to O_DIRECT; False where the file system refuses it (e.g. an older tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


def _full(write, fd, buf, offset):
    mv, done = memoryview(buf), 0
    while done < len(mv):
        done += write(fd, mv[done:], offset + done)


# ---- the per-process folder ------------------------------------------------------------------

_FOLDER = re.compile(r"^flexwrangle-(\d+)-(\d+)@(.+)$")     # flexwrangle-<pid>-<start time>@<host>
_folder_lock = threading.Lock()


@contextlib.contextmanager
def process_folder(offload_dir: Path):
    """This process's private folder under `offload_dir` (mode 0700) to create files in, removed
    again on exit: files made in it are unlinked once open, so it holds nothing after that."""
    offload_dir = Path(offload_dir)
    with _folder_lock:                    # one thread at a time makes and removes it
        offload_dir.mkdir(parents=True, exist_ok=True)
        folder = offload_dir / _folder_name(os.getpid())
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:           # left by a failed removal, or put there by someone else
            _check_private(folder)
        try:
            yield folder
        finally:
            try:
                folder.rmdir()
            except OSError:               # a file could not be unlinked: the next start sweeps it
                pass


def sweep_stale(offload_dir: Path) -> list[Path]:
    """Remove the process folders under `offload_dir` that this user's processes on this host left
    when they died (killed while creating a file); returns them. A folder is stale when its pid is
    gone or now names a process started at another time."""
    host, uid, removed = socket.gethostname(), os.geteuid(), []
    try:
        entries = list(os.scandir(offload_dir))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _FOLDER.match(entry.name)
        if m is None or m.group(3) != host or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_uid != uid or _alive(int(m.group(1)), int(m.group(2))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)      # never follows a link inside
        removed.append(Path(entry.path))
    if removed:
        log.info("flexwrangle: removed %d offload folder(s) left by dead processes in %s", len(removed), offload_dir)
    return removed


@functools.lru_cache(maxsize=None)
def _folder_name(pid: int) -> str:
    return f"flexwrangle-{pid}-{_start_time(pid)}@{socket.gethostname()}"


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in hundredths of a second since the epoch (None: no such
    process); with the pid, it names one process, so a reused pid does not keep a folder alive."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:      # dead: its descriptors are closed
            return None
        return round(process.create_time() * 100)
    except psutil.NoSuchProcess:
        return None


def _alive(pid: int, start: int) -> bool:
    try:
        return _start_time(pid) == start
    except psutil.AccessDenied:           # someone's process we cannot inspect: leave its folder
        return True


def _check_private(folder: Path) -> None:
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} exists but is not this process's private folder (owner uid {st.st_uid}, "
                              f"mode {stat.filemode(st.st_mode)}); remove it, or pass another offload_dir")
