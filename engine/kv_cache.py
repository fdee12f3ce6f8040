"""KV cache of one (attention layer, micro-batch), split by whole sequences across tiers.

Each part holds rows indexed by position: row t is (2, n_seq, n_kv, head_dim), keys then values,
so appending a token writes one contiguous row (one aligned write on disk) and reading the first
t positions is one read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .placement import CachePartPlan, Precision, plan_cache
from .policy import Policy
from .pools import BufferPool
from .tiers import TierArray, Tiers
from .transfer import CacheRead


@dataclass
class CachePart:
    tier: str
    lo: int            # first sequence of the micro-batch in this part
    hi: int
    array: TierArray
    plan: CachePartPlan
    norm: tuple[torch.Tensor, torch.Tensor] | None = None   # a 4-bit part's (mean, scale), channel_norm


def channel_norm(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, scale) of cache rows (s, 2, n, n_kv, d), over positions, per sequence:
    (1, 2, n, n_kv, d) each.

    A 4-bit cache groups values along head_dim, and some models' keys have a few channels far
    larger than the rest (Qwen2's key bias): min-max groups spanning such a channel leave the others
    one or two levels, and attention over that cache picks the wrong tokens. Storing
    (x - mean) / scale puts every channel in [-1, 1] first, so each keeps its share of the 16
    levels, as quantizing per channel would; the statistics come from a sequence's first write
    (its prompt), and per sequence, so a split of the micro-batch across tiers does not change them."""
    mean = rows.mean(dim=0, keepdim=True)
    scale = (rows - mean).abs().amax(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float16).tiny)
    return mean, scale


@dataclass
class LoadedPart:
    """Past keys and values of one part, ready for attention."""
    tier: str
    lo: int
    hi: int
    k: torch.Tensor    # (n, n_kv, t, d)
    v: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.k.device


class KVCache:
    def __init__(self, tiers: Tiers, policy: Policy, n_seq: int, n_kv: int, head_dim: int,
                 max_len: int, storage: torch.dtype, label: str):
        self.tiers = tiers
        self.parts: list[CachePart] = []
        lo = 0
        precision = Precision.of(policy, tiers.compute_device.type, storage)
        for plan in plan_cache(n_seq, n_kv, head_dim, policy.percents("cache"), precision):
            arr = TierArray(tiers, plan.tier, plan.format, plan.row_shape, max_len, f"{label}.{plan.tier}")
            self.parts.append(CachePart(plan.tier, lo, lo + plan.n_seq, arr, plan))
            lo += plan.n_seq

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values (b, n_kv, s, d) at positions [start, start + s)."""
        rows = torch.stack((k, v)).permute(3, 0, 1, 2, 4)            # (s, 2, b, n_kv, d)
        for p in self.parts:
            part = rows[:, :, p.lo: p.hi]
            if p.array.fmt.quant is not None:
                if p.norm is None:
                    p.norm = channel_norm(part.float())
                mean, scale = p.norm
                part = (part - mean) / scale
            p.array.write(start, part)

    def read(self, length: int, pool: BufferPool) -> CacheRead:
        """The first `length` positions of every part, each on the device that will attend over it,
        in the dtype it is attended in (`CachePartPlan`): a `CacheRead` of `LoadedPart`s that owns
        the pool buffers it filled (close it, or use it in a `with` block, once attended).

        Parts held in that form on that device are views (a CPU-tier fp16 cache attended on the
        CPU is read in place by the decode kernel, ops.attend_decode); the others are decoded into
        pool buffers of the full cache length (so one buffer serves every step)."""
        out, borrowed = [], []
        for p in self.parts:
            arr, dtype = p.array, p.plan.read_dtype
            dev = torch.device("cpu") if p.plan.attend_on == "cpu" else self.tiers.compute_device
            if not p.plan.copied:
                rows = arr.read(0, length, dev, dtype)                 # (t, 2, n, n_kv, d), a view
            else:
                buf = pool.get((arr.rows, *arr.shape), dtype, dev, f"working copy of {arr.what}")
                borrowed.append(buf)
                rows = arr.read(0, length, dev, dtype, out=buf[:length])
                if p.norm is not None:
                    mean, scale = p.norm
                    rows.mul_(scale.to(rows.device)).add_(mean.to(rows.device))
            kv = rows.permute(1, 2, 3, 0, 4)                           # (2, n, n_kv, t, d)
            out.append(LoadedPart(p.tier, p.lo, p.hi, kv[0], kv[1]))
        return CacheRead(pool, out, borrowed)

    def bytes_on(self, tier: str) -> int:
        return sum(p.array.nbytes for p in self.parts if p.tier == tier)

    def close(self) -> None:
        for p in self.parts:
            p.array.close()
        self.parts = []
