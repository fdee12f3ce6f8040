"""Small C kernels, compiled on first use with the machine's gcc and loaded with ctypes.

- `qlinear.c`: x @ W.T straight from a 4-bit weight grouped along its output dimension, so decode
  with few rows never writes the float weight out, and takes a fraction of the time of
  dequantizing it whole and multiplying by the copy (compression.KERNEL_MAX_ROWS says up to how
  many rows; docs/benchmarks.md has the figures).
- `attention.c`: decode attention over keys and values read where they lie, fp16 included, so a
  CPU-tier cache is never copied to float32 (ops.attend_decode).
- `rotary.c`: rotary position embedding in one pass (ops.apply_rotary), bit for bit as torch.
- `int8.c`: the two ends of an int8 product (int8.linear), quantizing activations per row and scaling
  the int32 sums back to float, each in one pass and bit for bit as torch computes them; and int8 rows
  made straight from 4-bit weights (int8.from_4bit), without the float32 copy in between.

Everything works without them: when gcc is missing or a build fails, `qlinear()`, `attention()`
and the others return None once with a warning and callers take the torch path.

The library is built for this CPU (-march=native) into $XDG_CACHE_HOME/flexwrangle/kernels (or
~/.cache/...), named by a hash of the source, the flags, the compiler and the CPU's feature flags, so
a cache shared between machines never hands one machine another's instructions. Set
FLEXWRANGLE_KERNELS=0 to use the torch path only, or FLEXWRANGLE_KERNELS_OFF to name the kernels to leave
out (comma-separated: qlinear, attention, rotary, int8_quantize, int8_scale, int8_rows_from_4bit), e.g. to
measure one.

Loading a library runs its code in this process, so the cache is trusted only as far as it can be:
- the folder must be this user's and writable by nobody else (it is created with mode 0700, and
  tightened to 0700 when only its owner can write to it); any other folder (another owner, group- or
  world-writable, a symbolic link) is not used: the kernel is built for this process alone in a
  private temporary folder, with a warning;
- a library is loaded only if its sha256 matches the one recorded beside it (`<name>.so.sha256`)
  when it was built; a corrupt or foreign library is rebuilt, not loaded. The file is opened once,
  hashed and loaded through /proc/self/fd, so what was checked is what runs;
- builds into the cache take an flock on the folder (released by the kernel if the builder dies).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel's OpenMP calls then bind to torch's libgomp and its pool)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}      # kernel name -> C function or None; "<source>.c" -> its library
# descriptors of loaded libraries, never closed: the loader knows a library by the path it was opened
# with (/proc/self/fd/<n>), so a reused number would hand back the library already loaded under it
_held: list[int] = []


class Segment(ctypes.Structure):
    """attention.c's segment_t: one piece of the keys and values, strides in elements."""
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("stride_b", ctypes.c_int64),
                ("stride_h", ctypes.c_int64), ("stride_t", ctypes.c_int64), ("len", ctypes.c_int32),
                ("dtype", ctypes.c_int32)]


_p, _i64 = ctypes.c_void_p, ctypes.c_int64
# name -> (source file, C function, argument types, what callers do without it)
_KERNELS = {
    "qlinear": ("qlinear.c", "qlinear_out_groups", [_p] * 5 + [ctypes.c_int] * 6,
                "the slower torch path for 4-bit weights"),
    "attention": ("attention.c", "decode_attention", [_p, ctypes.POINTER(Segment), ctypes.c_int, _p, _i64, _p]
                  + [ctypes.c_int] * 4 + [ctypes.c_float], "torch attention over a float32 copy of the cache"),
    "rotary": ("rotary.c", "rotary", [_p] + [_i64] * 7 + [_p, _p, _i64, _p], "torch's passes for rotary embeddings"),
    "int8_quantize": ("int8.c", "quantize_rows", [_p, _i64, _i64, _i64, _p, _p],
                      "torch's passes to quantize int8 products' inputs"),
    "int8_scale": ("int8.c", "scale_sums", [_p, _i64, _i64, _p, _p, _p],
                   "torch's passes to scale int8 products' sums"),
    "int8_rows_from_4bit": ("int8.c", "rows_from_4bit", [_p, _p, _p, _i64, _i64, _i64, _i64, _p, _p],
                            "dequantizing 4-bit weights to float32, then making int8 rows of them"),
}


def qlinear():
    """The C function `qlinear_out_groups` (see qlinear.c), or None when kernels are off or unbuildable."""
    return _kernel("qlinear")


def attention():
    """The C function `decode_attention` (see attention.c), or None when kernels are off or unbuildable."""
    return _kernel("attention")


def rotary():
    """The C function `rotary` (see rotary.c), or None when kernels are off or unbuildable."""
    return _kernel("rotary")


def int8_quantize():
    """The C function `quantize_rows` (see int8.c), or None when kernels are off or unbuildable."""
    return _kernel("int8_quantize")


def int8_scale():
    """The C function `scale_sums` (see int8.c), or None when kernels are off or unbuildable."""
    return _kernel("int8_scale")


def int8_rows_from_4bit():
    """The C function `rows_from_4bit` (see int8.c), or None when kernels are off or unbuildable."""
    return _kernel("int8_rows_from_4bit")


def _kernel(name: str):
    if name in _loaded:                          # every linear asks: no lock once it is settled
        return _loaded[name]
    if os.environ.get("FLEXWRANGLE_KERNELS", "1") == "0" or platform.system() != "Linux" or name in _switched_off():
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name)
    return _loaded[name]


def _switched_off() -> set[str]:
    names = {n.strip() for n in os.environ.get("FLEXWRANGLE_KERNELS_OFF", "").split(",") if n.strip()}
    if names - set(_KERNELS):
        raise ValueError(f"FLEXWRANGLE_KERNELS_OFF names {', '.join(sorted(names - set(_KERNELS)))}: "
                         f"the kernels are {', '.join(_KERNELS)}")
    return names


def _build_and_load(name: str):
    source, symbol, argtypes, fallback = _KERNELS[name]
    try:
        lib = _loaded.get(source) or _load(HERE / source)     # one library per source file, loaded once
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("flexwrangle: C kernel %s unavailable (%s); using %s", name, e, fallback)
        return None
    _loaded[source] = lib
    fn = getattr(lib, symbol)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


# Not torch.utils.cpp_extension: a C++ module with torch's headers takes about 50 s and 1.5 GB to build
# on 2 cores (these C files: 0.5 s), it needs ninja, and its cache checks neither ownership nor hashes.
def _load(source: Path) -> ctypes.CDLL:
    """The library built from `source`: from the cache when it holds a verified build, else built."""
    cc = os.environ.get("CC", "gcc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    name = f"{source.stem}-{key.hexdigest()[:16]}.so"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexwrangle" / "kernels"
    try:
        folder = _open_private(cache)
    except OSError as e:                          # not private, or not writable (a read-only home)
        log.warning("flexwrangle: not using the kernel cache %s (%s); building %s for this process only",
                    cache, e, name)
        with _compiled(cc, source) as path:
            return _dlopen(os.open(path, os.O_RDONLY))
    try:
        lib = _load_verified(folder, name)
        if lib is None:
            with _flock(folder):                  # one build at a time; another may have finished meanwhile
                lib = _load_verified(folder, name)
                if lib is None:
                    with _compiled(cc, source) as path:
                        data = path.read_bytes()
                    _write(folder, name + ".sha256", (hashlib.sha256(data).hexdigest() + "\n").encode())
                    _write(folder, name, data)
                    lib = _load_verified(folder, name)
        if lib is None:
            raise OSError(f"{cache / name} does not read back as it was written")
        return lib
    finally:
        os.close(folder)


def _open_private(cache: Path) -> int:
    """A descriptor of the cache folder (made with mode 0700 when missing), once it is known that only
    this user can write to it; PermissionError saying why not."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        cache.mkdir(mode=0o700)
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:                          # a symbolic link, or not a folder
        raise PermissionError(f"not a folder of its own: {e.strerror}") from e
    st = os.fstat(fd)
    problem = (f"owned by uid {st.st_uid}, not {os.geteuid()}" if st.st_uid != os.geteuid() else
               f"writable by others (mode {stat.filemode(st.st_mode)})" if st.st_mode & 0o022 else None)
    if problem:
        os.close(fd)
        raise PermissionError(f"{problem}; remove it and the next run makes it again, private to this user")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)
    return fd


def _load_verified(folder: int, name: str) -> ctypes.CDLL | None:
    """The library `name` in the cache if its bytes match the sha256 recorded when it was built."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
    except OSError:                               # missing, or a symbolic link: (re)built
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    h = hashlib.sha256()
    with open(fd, "rb", closefd=False) as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    try:
        recorded = _read(folder, name + ".sha256")
    except OSError:
        recorded = None
    if recorded != h.hexdigest():
        os.close(fd)
        if recorded is not None:
            log.warning("flexwrangle: the cached kernel %s does not match the sha256 recorded when it was built; "
                        "rebuilding it", name)
        return None
    return _dlopen(fd)


def _dlopen(fd: int) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    _held.append(fd)
    return lib


@contextlib.contextmanager
def _compiled(cc: str, source: Path):
    """The path of `source` compiled in a private temporary folder, while the block runs."""
    with tempfile.TemporaryDirectory(prefix="flexwrangle-kernel-") as tmp:
        out = Path(tmp) / f"{source.stem}.so"
        r = subprocess.run([cc, *FLAGS, "-o", str(out), str(source), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip()[:500]}")
        yield out


@contextlib.contextmanager
def _flock(folder: int):
    fcntl.flock(folder, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(folder, fcntl.LOCK_UN)


def _read(folder: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
    with open(fd, "rb") as f:
        return f.read(256).decode(errors="replace").strip()


def _write(folder: int, name: str, data: bytes) -> None:
    """`name` in the folder holds `data`, replaced whole (a reader sees the old bytes or the new)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=folder)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
