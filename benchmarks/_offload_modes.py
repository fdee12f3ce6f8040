"""What `offload_vs_baselines.py` runs in each mode: the shapes, the batches each system tries, the
fixed engine runs and the overlap cases, as data.

Why the lists are what they are (which batch passed the cap in which run, what each run cost) is
recorded in docs/benchmarks.md, section `offload_vs_baselines_plan`, beside the measured sections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# --percent of the engine runs: W_GPU W_CPU C_GPU C_CPU A_GPU A_CPU (disk the rest)
W_DISK_CACHE_CPU = (0, 0, 0, 100, 100, 0)
W_CPU_CACHE_CPU = (0, 100, 0, 100, 100, 0)
ALL_IN_MEMORY = (100, 0, 100, 0, 100, 0)

COMPRESS_WEIGHT = ("--compress-weight",)


@dataclass(frozen=True)
class EngineRun:
    """One fixed engine run under the cap (instead of a climb over blocks)."""
    block: tuple[int, int]                 # (gpu_batch_size, num_gpu_batches)
    flags: tuple[str, ...] = ()            # extra engine.bench flags
    percent: tuple[int, ...] = W_DISK_CACHE_CPU


@dataclass(frozen=True)
class ShapePlan:
    """What runs at one (prompt_len, gen_len)."""
    shape: tuple[int, int]
    accelerate_batches: tuple[int, ...]            # Accelerate's climb under the cap
    engine_blocks: tuple[tuple[int, int], ...] = ()  # the engine's climb under the cap ...
    engine_runs: tuple[EngineRun, ...] = ()        # ... or these fixed runs, when given
    climb_on: bool = True      # False: no extra doublings past the lists (each run is long)
    in_memory_batch: int | None = None             # transformers vs engine, everything in RAM
    in_memory_larger: int | None = None            # a larger engine batch beside them


@dataclass(frozen=True)
class OverlapCase:
    """Overlap on vs off with the weights on disk, in alternating rounds."""
    shape: tuple[int, int]
    block: tuple[int, int]
    variants: tuple[tuple[str, ...], ...] = ((),)  # extra engine flags, one set of rounds each
    rounds: int = 1


@dataclass(frozen=True)
class Mode:
    model: str
    cap_gib: float                         # the cap on peak RSS of every capped run
    accelerate_max_memory: str             # Accelerate's max_memory for the CPU
    plans: tuple[ShapePlan, ...]
    overlap: tuple[OverlapCase, ...]
    # doublings of the last entry of each system's list while its runs still fit the cap
    extra_doublings: dict = field(default_factory=dict)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [p.shape for p in self.plans]


MODES = {
    "full": Mode(
        model="opt-1.3b", cap_gib=5.0, accelerate_max_memory="1GiB",
        # Accelerate climbs no further than its list: the step past it passes the cap, and each of
        # its decode-heavy runs takes 10+ minutes
        extra_doublings={"engine": 1, "accelerate": 0},
        plans=(
            ShapePlan((512, 32), accelerate_batches=(4, 8), engine_blocks=((8, 1), (8, 2)), in_memory_batch=4),
            # in_memory_larger: the engine's larger batch at about transformers' peak RSS
            ShapePlan((32, 64), accelerate_batches=(32, 64), engine_blocks=((64, 1),), in_memory_batch=16,
                      in_memory_larger=32),
            # gen 256: Accelerate's peak at one batch moves by half a GiB between runs, so it tries
            # the batches around its cap; the engine keeps its weights 4-bit (at 48-80 rows a row
            # costs the 4-bit kernel about the same) on disk, then in CPU RAM, where they fit beside
            # the fp16 cache and no disk read steals compute (section `What a disk read costs the compute`)
            ShapePlan((32, 256), accelerate_batches=(16, 20, 24), climb_on=False, engine_runs=(
                EngineRun((48, 1), COMPRESS_WEIGHT),
                *(EngineRun((b, 1), COMPRESS_WEIGHT, W_CPU_CACHE_CPU) for b in (48, 56, 64, 72, 80)))),
        ),
        # rounds alternate on and off because the disk's rate drifts within minutes; prefill is
        # compute-bound and the same either way, so the gen-64 case, where decode (read and compute
        # about even with 4-bit weights at batch 16) is most of the run, shows the decode's gain
        overlap=(OverlapCase((32, 16), (16, 1), variants=((), COMPRESS_WEIGHT), rounds=3),
                 OverlapCase((32, 64), (16, 1), variants=(COMPRESS_WEIGHT,), rounds=3)),
    ),
    "quick": Mode(
        model="opt-125m", cap_gib=1.6, accelerate_max_memory="200MiB",
        plans=(ShapePlan((32, 8), accelerate_batches=(4,), engine_blocks=((8, 1),), in_memory_batch=4),),
        overlap=(OverlapCase((16, 8), (8, 1)),),
    ),
}
