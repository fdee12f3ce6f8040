"""Policy: the batch shape and where weights, KV cache and activations live.

"gpu" names the compute device: CUDA when present; without one, the CPU computes and the gpu
share is a byte budget inside RAM that the engine enforces and reports. Each tensor kind is
split gpu / cpu / disk, disk taking the remainder of the two percentages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .compression import CompressionConfig

TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 8            # sequences per micro-batch (one compute call)
    num_gpu_batches: int = 1           # micro-batches per block that share each layer's weights
    w_gpu_percent: float = 100.0       # weights: share of each layer on the compute device
    w_cpu_percent: float = 0.0         # ... in CPU RAM; disk holds the rest
    cache_gpu_percent: float = 100.0   # KV cache: share of each micro-batch's sequences on the device
    cache_cpu_percent: float = 0.0     # ... in CPU RAM; disk holds the rest
    act_gpu_percent: float = 100.0     # activations (hidden states) between layers: 100 on one tier
    act_cpu_percent: float = 0.0
    overlap: bool = True               # prefetch next weights/cache and store caches on a thread
    sep_layer: bool = True             # attention and MLP as separate layers (finer prefetch)
    cpu_cache_compute: bool = False    # decode attention where the cache lives (CPU), not on device
    compress_weight: bool = False      # group-wise quantization of weights (2-D tensors)
    comp_weight_config: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(num_bits=4, group_size=64, group_dim=0))
    int8_matmul: bool = False          # decoder weights as int8 rows, multiplied by int8 activations
    #                                    (engine/int8.py): faster prefill on CPUs, changes logits slightly;
    #                                    with compress_weight, 4-bit weights are made int8 rows for
    #                                    prefill, and steps of few rows multiply them as 4-bit
    compress_cache: bool = False       # group-wise quantization of the KV cache
    comp_cache_config: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(num_bits=4, group_size=64, group_dim=-1))

    def __post_init__(self):
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise ValueError(f"gpu_batch_size ({self.gpu_batch_size}) and num_gpu_batches "
                             f"({self.num_gpu_batches}) must be at least 1")
        for kind in ("w", "cache", "act"):
            g, c = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            if g < 0 or c < 0 or g + c > 100 + 1e-9:
                raise ValueError(f"{kind}_gpu_percent={g} and {kind}_cpu_percent={c} must be >= 0 and "
                                 "add up to at most 100 (disk takes the remainder)")
        if self.act_gpu_percent not in (0, 100) and self.act_cpu_percent not in (0, 100):
            raise ValueError("activations live on one tier: use 100 for one of act_gpu_percent / "
                             "act_cpu_percent, or 0 and 0 for disk")

    @property
    def block_size(self) -> int:
        """Sequences per block: every layer's weights are loaded once for this many."""
        return self.gpu_batch_size * self.num_gpu_batches

    def percents(self, kind: str) -> tuple[float, float, float]:
        """(gpu, cpu, disk) percentages for kind in 'w', 'cache', 'act'."""
        g, c = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
        return g, c, max(0.0, round(100.0 - g - c, 9))     # 62.4 + 37.6 leaves 7e-15 in floats

    @property
    def act_tier(self) -> str:
        if self.act_gpu_percent >= 100:
            return "gpu"
        return "cpu" if self.act_cpu_percent >= 100 else "disk"

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_percent(cls, percent, **kwargs) -> "Policy":
        """Build from FlexGen's six numbers: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu."""
        if len(percent) != 6:
            raise ValueError(f"--percent takes six numbers (w_gpu w_cpu cache_gpu cache_cpu act_gpu "
                             f"act_cpu), got {len(percent)}")
        keys = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                "act_gpu_percent", "act_cpu_percent")
        return cls(**dict(zip(keys, map(float, percent))), **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        d = dict(d)
        for key in ("comp_weight_config", "comp_cache_config"):
            if isinstance(d.get(key), dict):
                d[key] = CompressionConfig(**d[key])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Policy fields {sorted(unknown)}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d)
