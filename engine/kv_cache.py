"""KV cache of one (attention layer, micro-batch), split by whole sequences across tiers.

Each part holds rows indexed by position: row t is (2, n_seq, n_kv, head_dim), keys then values,
so appending a token writes one contiguous row (one aligned write on disk) and reading the first
t positions is one read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import Policy
from .tiers import BufferPool, Format, TierArray, Tiers


def split_counts(n: int, percents: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sequences per tier (gpu, cpu, disk) for a micro-batch of n."""
    g = round(n * percents[0] / 100)
    gc = round(n * (percents[0] + percents[1]) / 100)
    return g, gc - g, n - gc


def cache_format(tiers: Tiers, policy: Policy, tier: str, storage: torch.dtype) -> Format:
    quant = policy.comp_cache_config if policy.compress_cache else None
    if tier == "gpu":
        return Format(tiers.compute_dtype, round_to=storage, quant=quant)
    return Format(storage, quant=quant)


@dataclass
class CachePart:
    tier: str
    lo: int            # first sequence of the micro-batch in this part
    hi: int
    array: TierArray


@dataclass
class LoadedPart:
    """Past keys and values of one part, ready for attention."""
    tier: str
    lo: int
    hi: int
    k: torch.Tensor    # (n, n_kv, t, d)
    v: torch.Tensor
    buffer: torch.Tensor | None = None   # the pool buffer k and v view, if any

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype


class KVCache:
    def __init__(self, tiers: Tiers, policy: Policy, n_seq: int, n_kv: int, head_dim: int,
                 max_len: int, storage: torch.dtype, label: str):
        self.tiers = tiers
        self.parts: list[CachePart] = []
        lo = 0
        for tier, count in zip(("gpu", "cpu", "disk"), split_counts(n_seq, policy.percents("cache"))):
            if count:
                fmt = cache_format(tiers, policy, tier, storage)
                arr = TierArray(tiers, tier, fmt, (2, count, n_kv, head_dim), max_len, f"{label}.{tier}")
                self.parts.append(CachePart(tier, lo, lo + count, arr))
                lo += count

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values (b, n_kv, s, d) at positions [start, start + s)."""
        rows = torch.stack((k, v)).permute(3, 0, 1, 2, 4)            # (s, 2, b, n_kv, d)
        for p in self.parts:
            p.array.write(start, rows[:, :, p.lo: p.hi])

    def read(self, length: int, device_for_tier, pool: BufferPool) -> list[LoadedPart]:
        """The first `length` positions of every part, each on the device that will attend over it.

        Parts already compute-ready are views; the others are decoded into pool buffers of the
        full cache length (so one buffer serves every step)."""
        out = []
        for p in self.parts:
            dev = device_for_tier(p.tier)
            dtype = self.tiers.compute_dtype if dev == self.tiers.compute_device else torch.float32
            arr, buf = p.array, None
            if p.tier == "gpu" and arr.fmt.quant is None and arr.fmt.dtype == dtype and dev == self.tiers.compute_device:
                rows = arr.read(0, length, dev, dtype)                 # (t, 2, n, n_kv, d), a view
            else:
                buf = pool.get((arr.rows, *arr.shape), dtype, dev, f"working copy of {arr.what}")
                rows = arr.read(0, length, dev, dtype, out=buf[:length])
            kv = rows.permute(1, 2, 3, 0, 4)                           # (2, n, n_kv, t, d)
            out.append(LoadedPart(p.tier, p.lo, p.hi, kv[0], kv[1], buf))
        return out

    def bytes_on(self, tier: str) -> int:
        return sum(p.array.nbytes for p in self.parts if p.tier == tier)

    def close(self) -> None:
        for p in self.parts:
            p.array.close()
        self.parts = []
