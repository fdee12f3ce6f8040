"""Small C kernels, compiled on first use with the machine's gcc and loaded with ctypes.

- `qlinear.c`: x @ W.T straight from a 4-bit weight grouped along its output dimension, so decode
  with few rows never writes the float weight out (OPT-1.3b's 16M-value fc1 weight: 3.0 ms at 2
  rows and 7.4 ms at 16, against 13.6 ms to dequantize it whole and 8-18 ms more to multiply by
  it; compression.KERNEL_MAX_ROWS has the rest).
- `attention.c`: decode attention over keys and values read where they lie, fp16 included, so a
  CPU-tier cache is never copied to float32 (ops.attend_decode).

Everything works without them: when gcc is missing or a build fails, `qlinear()` and
`attention()` return None once with a warning and callers take the torch path.

The library is built for this CPU (-march=native) into $XDG_CACHE_HOME/flexwrangle/kernels (or
~/.cache/...), named by a hash of the source, the flags, the compiler and the CPU's feature flags, so
a cache shared between machines never hands one machine another's instructions. Set
FLEXWRANGLE_KERNELS=0 to use the torch path only.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel's OpenMP calls then bind to torch's libgomp and its pool)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


class Segment(ctypes.Structure):
    """attention.c's segment_t: one piece of the keys and values, strides in elements."""
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("stride_b", ctypes.c_int64),
                ("stride_h", ctypes.c_int64), ("stride_t", ctypes.c_int64), ("len", ctypes.c_int32),
                ("dtype", ctypes.c_int32)]


# name -> (C function, argument types, what callers do without it)
_KERNELS = {
    "qlinear": ("qlinear_out_groups", [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6,
                "the slower torch path for 4-bit weights"),
    "attention": ("decode_attention", [ctypes.c_void_p, ctypes.POINTER(Segment), ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_float],
                  "torch attention over a float32 copy of the cache"),
}


def qlinear():
    """The C function `qlinear_out_groups` (see qlinear.c), or None when kernels are off or unbuildable."""
    return _kernel("qlinear")


def attention():
    """The C function `decode_attention` (see attention.c), or None when kernels are off or unbuildable."""
    return _kernel("attention")


def _kernel(name: str):
    if name in _loaded:                          # every linear asks: no lock once it is settled
        return _loaded[name]
    if os.environ.get("FLEXWRANGLE_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name)
    return _loaded[name]


def _build_and_load(name: str):
    symbol, argtypes, fallback = _KERNELS[name]
    try:
        lib = ctypes.CDLL(str(_build(HERE / f"{name}.c")))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("flexwrangle: C kernel %s unavailable (%s); using %s", name, e, fallback)
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def _build(source: Path) -> Path:
    cc = os.environ.get("CC", "gcc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexwrangle" / "kernels"
    target = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)      # build aside, then rename: concurrent builds are safe
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
