"""Moving a layer's weights and a micro-batch's KV cache to the compute device, with explicit ownership.

A `WeightLoad` is one layer's weights on their way to compute. It owns everything the load took:
the pool buffers it borrowed, the disk staging buffers its packed or stored bytes still view, and
gives all of it back when its `with` block ends, or at `close()` when it is discarded unused. A
`CacheRead` does the same for one micro-batch's past keys and values.

The lifecycle of one layer load (`schedule.BlockRunner.run_layers`):

  1. I/O thread, `WeightLoad.__init__`: the layer's disk-homed tensors are read at once into one
     staging buffer (they share a file; `place_layer`). Each tensor then becomes
       - a view, when it is compute-ready where it lives (the gpu tier, plain, compute dtype);
       - a copy of its stored bytes in a borrowed uint8 buffer, when it is computed with as stored
         (int8 rows, a quantized table `embed` gathers rows from) and lives off the gpu tier;
       - `Widen` (on a CPU compute device, plain weights off the gpu tier): its stored bytes,
         still viewing the staging buffer; no float buffer borrowed yet;
       - `Packed` (quantized): its packed parts, possibly viewing the staging buffer, and a
         borrowed float buffer (a whole working copy, or only `compression.linear`'s scratch when
         steps multiply packed);
       - else (CUDA, plain off the device) decoded into a borrowed working copy.
  2. Main thread, `finish(defer)`: `Widen` weights borrow their working copy now and are widened
     into it; `Packed` weights are dequantized into theirs (or made `QuantizedWeight`s that
     multiply packed, with `defer`, keeping their staging view until the layer is done). Each
     staging view no longer needed is given back at once.
  3. Main thread, end of the `with` block: the remaining staging views and every borrowed buffer
     go back to STAGING and the pool.

Converting on the main thread rather than the I/O thread is deliberate: on a CPU the cores then
alternate between converting and computing instead of fighting over them (a one-core I/O thread
dequantizing beside two compute threads makes decode steps slower than no overlap at all), and
the I/O thread only waits on the disk. Borrowing a `Widen` weight's float buffer at finish, not at
the read, keeps one float copy of each layer shape in the pool, not two (the prefetched layer
waits as its stored bytes, half the size in fp16).

The lifecycle of one cache read (`kv_cache.KVCache.read`, on the cache I/O thread): each part of
the micro-batch's cache is viewed in place when it is already in the form and on the device that
attends it; otherwise a full-length buffer is borrowed from the pool (one buffer serves every
step) and the part decoded into it. The `CacheRead` gives those buffers back once the micro-batch
has attended (or, for a shared prefix, once every micro-batch has).
"""
from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from . import int8 as int8_format
from .compression import QuantizedTensor, QuantizedWeight, dequantize, padded_shape
from .disk import STAGING
from .placement import Borrow
from .pools import BufferPool
from .tiers import TierArray

if TYPE_CHECKING:
    from .weights import LayerWeights


class Packed(NamedTuple):
    """A quantized weight read onto the compute device, waiting for `WeightLoad.finish`."""
    parts: QuantizedTensor
    release: Callable[[], None]    # gives back the disk staging buffer `parts` may view
    out: torch.Tensor              # the borrowed buffer it dequantizes into
    int8: bool = False             # then made int8 rows in that buffer (int8.from_4bit or quantize_over)


class Widen(NamedTuple):
    """A plain (e.g. fp16) weight's stored bytes, waiting for `WeightLoad.finish` to widen them into
    a working buffer borrowed then."""
    arr: TierArray
    raw: torch.Tensor              # uint8 (1, row_bytes): a disk staging buffer or the CPU tier's bytes
    release: Callable[[], None]    # gives back the staging buffer `raw` may view
    borrow: Borrow                 # the working buffer to widen into


class SharedStaging:
    """A staging buffer several weights view: back to STAGING once every hold is released."""

    def __init__(self, buf):
        self.buf, self.holds, self._lock = buf, 1, threading.Lock()

    def hold(self) -> Callable[[], None]:
        with self._lock:
            self.holds += 1
        return self.release

    def release(self) -> None:
        with self._lock:
            self.holds -= 1
            last = self.holds == 0
        if last:
            STAGING.put(self.buf)


class WeightLoad:
    """One layer's weights read for the compute device; owns the buffers that read borrowed.

    Made on the I/O thread (the read), finished and used on the main thread:

        with layer.weights.load(pool, packed) as load:
            compute(load.finish(defer))

    What each weight borrows, and when, is its plan's (`placement.TensorPlan.how` and `.borrow`);
    `packed`: the steps will multiply 2-D 4-bit weights packed, so those borrow only scratch."""

    def __init__(self, weights: "LayerWeights", pool: BufferPool, packed: bool = False):
        self.weights, self.pool, self.packed = weights, pool, packed
        self.tensors: dict = {}
        self._borrowed: list[torch.Tensor] = []          # pool buffers, back at close
        self._releases: list[Callable[[], None]] = []    # staging views kept past finish, back at close
        self._finished = False
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _borrow(self, b: Borrow, what: str) -> torch.Tensor:
        buf = self.pool.get(b.shape, b.dtype, self.weights.tiers.compute_device, what)
        self._borrowed.append(buf)
        return buf

    def _read(self) -> None:
        lw, out = self.weights, self.tensors
        dev, dtype = lw.tiers.compute_device, lw.tiers.compute_dtype
        raws, staging = lw.read_shared()
        try:
            for name, arr in lw.arrays.items():
                plan, raw = lw.plans[name], raws.get(name)
                how, need = plan.how(arr.tier), plan.borrow(arr.tier, self.packed)
                if how == "stored":                          # a copy of the bytes off the gpu tier
                    buf = self._borrow(need, f"packed copy of {arr.what}") if need else None
                    out[name] = arr.read_quantized(dev, buf, raw)[0]
                elif how == "view":
                    out[name] = arr.read(0, 1, dev, dtype)[0]
                elif how == "widen":                         # its buffer is borrowed at finish
                    own, release = arr.read_bytes(raw)
                    out[name] = Widen(arr, own, staging.hold() if raw is not None else release, need)
                else:
                    buf = self._borrow(need, f"{'scratch' if self.packed else 'working copy'} of {arr.what}")
                    if how == "dequantize" and raw is not None:      # views the shared read
                        out[name] = Packed(arr.read_quantized(dev, None, raw)[0], staging.hold(), buf, plan.requant)
                    elif how == "dequantize":
                        out[name] = Packed(*arr.read_quantized(dev), buf, plan.requant)
                    else:                                    # "decode": plain, widened by the copy
                        out[name] = arr.read(0, 1, dev, dtype, out=buf.view(1, *need.shape), raw=raw)[0]
        finally:
            if staging is not None:
                staging.release()                 # the read's own hold; Packed and Widen weights keep theirs

    def finish(self, defer: bool = False) -> dict:
        """The layer's tensors, ready to compute with (see the module docstring, step 2).

        With `defer`, 2-D `Packed` weights become `QuantizedWeight`s that `ops.linear` multiplies
        straight from the packed values, their borrowed buffer as scratch, and keep their staging
        view until close; so do those marked `int8`: few rows multiply fastest straight from 4-bit
        values, and the weight is not requantized for them. Without `defer`, a `Packed` weight
        marked `int8` is made int8 rows in its buffer (int8.from_4bit, or int8.quantize_over of it dequantized)."""
        w = self.tensors
        for name, t in w.items():
            if isinstance(t, Widen):
                a = t.arr
                buf = self._borrow(t.borrow, f"working copy of {a.what}")
                w[name] = a.read(0, 1, buf.device, buf.dtype, out=buf.view(1, *a.shape), raw=t.raw)[0]
                t.release()
            elif isinstance(t, Packed):
                if t.int8 and not defer and t.out.dtype == torch.float32:   # (CUDA computes in fp16: as float)
                    rows = int8_format.from_4bit(t.parts, t.out)       # None without the C kernel
                    w[name] = rows if rows is not None else int8_format.quantize_over(
                        dequantize(t.parts, torch.float32, t.out))
                    t.release()
                elif defer and len(t.parts.shape) == 2:
                    w[name] = QuantizedWeight(t.parts, t.out)
                    self._releases.append(t.release)
                elif t.out.numel() < math.prod(padded_shape(t.parts.shape, t.parts.config)):
                    raise RuntimeError(f"{name}: loaded with packed=True (scratch only) but finished without "
                                       "defer; load and finish must agree")
                else:
                    w[name] = dequantize(t.parts, t.out.dtype, t.out)
                    t.release()
        self._finished = True
        return w

    def close(self) -> None:
        """Give back everything this load holds: staging views (of weights never finished, or kept
        past finish) and borrowed buffers. Idempotent."""
        if not self._finished:
            for t in self.tensors.values():
                if isinstance(t, (Packed, Widen)):
                    self._releases.append(t.release)
        self.tensors.clear()                       # drop the views before their memory is reused
        for release in self._releases:
            release()
        for buf in self._borrowed:
            self.pool.put(buf)
        self._releases, self._borrowed, self._finished = [], [], True

    def __enter__(self) -> "WeightLoad":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CacheRead:
    """One micro-batch's past keys and values of one layer, read for attention (kv_cache.LoadedPart
    each); owns the pool buffers decoded parts fill, given back when its `with` block ends."""

    def __init__(self, pool: BufferPool | None, parts: list | None, buffers: list[torch.Tensor] = ()):
        self.pool, self.parts, self._buffers = pool, parts, list(buffers)

    @classmethod
    def nothing(cls) -> "CacheRead":
        """No past (prefill, or a layer without a cache)."""
        return cls(None, None)

    def close(self) -> None:
        self.parts = None                          # drop the views before their buffers are lent again
        for buf in self._buffers:
            self.pool.put(buf)
        self._buffers = []

    def __enter__(self) -> "CacheRead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
