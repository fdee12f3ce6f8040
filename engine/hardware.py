"""What this machine can do: a probe that measures compute and transfer rates, cached as JSON.

`probe()` measures this machine (engine.hardware_probe); `load_hardware()` reuses the cached
measurement (`.cache/hardware.json`, keyed by host name and CPU count) and re-reads the
capacities, which change from minute to minute; caps override them.

    python -m engine.hardware [--out FILE] [--refresh] [--quick] [--gpu-mem 2GB --cpu-mem 8GB --disk-mem 50GB]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .hardware_probe import INT8_M, SMALL_M, measure, monotone
from .tiers import fmt_bytes, parse_bytes

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "hardware.json"
__all__ = ["Hardware", "probe", "load_hardware", "cache_key", "SMALL_M", "INT8_M", "DEFAULT_CACHE"]


@dataclass(frozen=True)
class Hardware:
    """Measured rates of one machine (rates in units per second) and its memory capacities in bytes."""

    host: str                          # host name the measurement belongs to
    cpu_count: int
    torch_threads: int                 # torch intra-op threads during the probe
    compute_device: str                # "cpu" or "cuda"
    compute_dtype: str                 # "float32" on CPU, "float16" on CUDA
    matmul_flops: float                # large matmul (prefill-shaped, matmul_rows rows), FLOP/s
    matmul_rows: int                   # the row count (and size) of that square matmul
    matmul_small_m: tuple              # ((M, FLOP/s), ...): decode-shaped matmuls through ops.linear
    int8_matmul: tuple                 # ((M, op/s), ...) at INT8_M: int8.linear, activations quantized included
    attn_prefill_flops: float          # ops.attend with a causal mask, FLOP/s (4 b nh s t d per call)
    attn_decode_elems_per_s: float     # decode attention: cached k + v elements per second, stored form (ops.attend_any)
    memcpy_bytes_per_s: float          # a large tensor copy (bytes copied)
    convert_elems_per_s: float         # storage dtype -> compute dtype into a reused buffer (fp16 -> fp32 on CPU)
    narrow_elems_per_s: float          # compute dtype -> storage dtype (cache stores)
    h2d_bytes_per_s: float             # CPU -> CUDA copy (0 without CUDA)
    d2h_bytes_per_s: float             # CUDA -> CPU copy (0 without CUDA)
    dequant_elems_per_s: float         # 4-bit weights (grouped along the output dim) -> compute dtype
    cache_dequant_elems_per_s: float   # 4-bit KV cache (grouped along the head dim) -> compute dtype
    quant_elems_per_s: float           # KV cache rows -> 4-bit (what a cache store does)
    io_memcpy_bytes_per_s: float       # the same six rates on the engine's I/O thread (io_threads torch threads)
    io_convert_elems_per_s: float
    io_narrow_elems_per_s: float
    io_dequant_elems_per_s: float
    io_cache_dequant_elems_per_s: float
    io_quant_elems_per_s: float
    io_threads: int
    disk_read_bytes_per_s: float       # O_DIRECT, large reads
    disk_write_bytes_per_s: float      # O_DIRECT, large writes
    disk_read_latency_s: float         # one 4 KiB O_DIRECT read
    disk_write_latency_s: float        # one 4 KiB O_DIRECT write
    disk_direct: bool                  # O_DIRECT worked where the probe wrote (else buffered + fadvise)
    op_overhead_s: float               # one tiny torch op (Python call + dispatch)
    attn_layer_overhead_s: float       # one decode step of one attention layer at toy sizes (all overhead)
    mlp_layer_overhead_s: float        # ... of one MLP layer
    gpu_mem: int                       # compute-device memory budget: CUDA memory, or RAM available on CPU
    cpu_mem: int                       # RAM available
    disk_mem: int                      # free bytes where offload files go
    ram_available: int = 0             # RAM available (not changed by caps: the gpu and cpu tiers share it on CPU)
    quick: bool = False                # measured with the short probe
    probe_seconds: float = 0.0
    measured_at: str = ""

    # ---- derived rates -------------------------------------------------------------------------
    def matmul_rate(self, rows: int) -> float:
        """FLOP/s of `ops.linear` with `rows` rows (log-log interpolation over the measured table)."""
        table = dict(self.matmul_small_m)
        table[self.matmul_rows] = max(self.matmul_flops, table.get(self.matmul_rows, 0.0))
        return _interpolate(monotone(sorted(table.items())), rows)

    def int8_matmul_rate(self, rows: int) -> float:
        """Operations/s of `int8.linear` (Policy.int8_matmul) with `rows` rows, as matmul_rate."""
        return _interpolate(monotone(sorted(self.int8_matmul)), rows)

    def with_caps(self, gpu_mem=None, cpu_mem=None, disk_mem=None) -> "Hardware":
        """A copy whose capacities are the given caps ('2GB', bytes) where given."""
        changes = {k: parse_bytes(v) for k, v in
                   (("gpu_mem", gpu_mem), ("cpu_mem", cpu_mem), ("disk_mem", disk_mem)) if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["matmul_small_m"] = [list(p) for p in self.matmul_small_m]
        d["int8_matmul"] = [list(p) for p in self.int8_matmul]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        d = dict(d)
        d["matmul_small_m"] = tuple(tuple(p) for p in d["matmul_small_m"])
        d["int8_matmul"] = tuple(tuple(p) for p in d["int8_matmul"])      # (KeyError: an old cache, probed again)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> dict[str, str]:
        """Human-readable figures, for CLIs and reports."""
        g = lambda x: f"{x / 1e9:.2f}"
        return {
            "host": f"{self.host} ({self.cpu_count} CPUs, torch threads {self.torch_threads}, "
                    f"compute {self.compute_device} {self.compute_dtype})",
            "matmul": f"{g(self.matmul_flops)} GFLOP/s; decode-shaped "
                      + ", ".join(f"M={m}: {g(r)}" for m, r in self.matmul_small_m),
            "int8 matmul": ", ".join(f"M={m}: {g(r)}" for m, r in self.int8_matmul) + " G op/s",
            "attention": f"prefill {g(self.attn_prefill_flops)} GFLOP/s, decode {g(self.attn_decode_elems_per_s)} Gelem/s",
            "memory": f"memcpy {g(self.memcpy_bytes_per_s)} GB/s, fp16->compute {g(self.convert_elems_per_s)} "
                      f"Gelem/s, compute->fp16 {g(self.narrow_elems_per_s)} Gelem/s"
                      + (f", H2D {g(self.h2d_bytes_per_s)} GB/s, D2H {g(self.d2h_bytes_per_s)} GB/s"
                         if self.compute_device == "cuda" else ""),
            "4-bit": f"dequantize weights {g(self.dequant_elems_per_s)}, cache {g(self.cache_dequant_elems_per_s)}, "
                     f"quantize cache {g(self.quant_elems_per_s)} Gelem/s",
            "I/O thread": f"{self.io_threads} torch thread: memcpy {g(self.io_memcpy_bytes_per_s)} GB/s, fp16->compute "
                          f"{g(self.io_convert_elems_per_s)} Gelem/s, compute->fp16 {g(self.io_narrow_elems_per_s)}, "
                          f"dequantize weights {g(self.io_dequant_elems_per_s)}, cache "
                          f"{g(self.io_cache_dequant_elems_per_s)}, quantize cache "
                          f"{g(self.io_quant_elems_per_s)} Gelem/s",
            "disk": f"read {g(self.disk_read_bytes_per_s)} GB/s, write {g(self.disk_write_bytes_per_s)} GB/s, "
                    f"4 KiB read {self.disk_read_latency_s * 1e6:.0f} us, "
                    f"write {self.disk_write_latency_s * 1e6:.0f} us"
                    f" ({'O_DIRECT' if self.disk_direct else 'buffered + fadvise'})",
            "overhead": f"{self.op_overhead_s * 1e6:.1f} us per tiny torch op; per decode layer at toy size: "
                        f"attention {self.attn_layer_overhead_s * 1e6:.0f} us, "
                        f"MLP {self.mlp_layer_overhead_s * 1e6:.0f} us",
            "capacity": f"gpu {fmt_bytes(self.gpu_mem)}, cpu {fmt_bytes(self.cpu_mem)}, "
                        f"disk {fmt_bytes(self.disk_mem)}",
            "probe": f"{self.probe_seconds:.1f} s{' (quick)' if self.quick else ''} at {self.measured_at}",
        }


def probe(quick: bool = False, disk_dir: str | Path | None = None) -> Hardware:
    """Measure this machine (about 10 s; `quick` about 3 s with smaller sizes)."""
    return Hardware(**measure(quick, disk_dir, default_disk_dir=DEFAULT_CACHE.parent))


def _interpolate(table: list[tuple[int, float]], rows: int) -> float:
    """The rate at `rows` from a sorted (rows, rate) table: log-log between measured points, the
    last rate above them, proportional to rows below the first (per-call costs dominate there)."""
    if rows >= table[-1][0]:
        return table[-1][1]
    if rows <= table[0][0]:
        return table[0][1] * rows / table[0][0]
    for (m0, r0), (m1, r1) in zip(table, table[1:]):
        if m0 <= rows <= m1:
            a = (math.log(rows) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return math.exp(math.log(r0) + a * (math.log(r1) - math.log(r0)))
    return table[-1][1]


# ---- the cache -----------------------------------------------------------------------------------
def cache_key() -> str:
    """Host, CPU count, compute device, and the OpenMP wait policy (it changes CPU rates under load)."""
    omp = os.environ.get("OMP_WAIT_POLICY", "").lower()
    return (f"{socket.gethostname()}-{os.cpu_count()}cpu-{'cuda' if torch.cuda.is_available() else 'cpu'}"
            + (f"-omp-{omp}" if omp else ""))


def load_hardware(path: str | Path | None = None, refresh: bool = False, quick: bool = False,
                  gpu_mem=None, cpu_mem=None, disk_mem=None, disk_dir=None) -> Hardware:
    """This machine's Hardware: the cached measurement if there is one (else probe and cache it),
    with capacities re-read now and overridden by the given caps."""
    path = Path(path) if path else DEFAULT_CACHE
    entries = _read_cache(path)
    key = cache_key()
    hw = None
    if not refresh and key in entries:
        try:
            hw = Hardware.from_dict(entries[key])
        except (TypeError, KeyError, ValueError):
            hw = None                                           # an old or damaged entry: measure again
        if hw is not None and hw.quick and not quick:
            hw = None                                           # a quick probe does not stand in for a full one
    if hw is None:
        hw = probe(quick=quick, disk_dir=disk_dir)
        entries[key] = hw.to_dict()
        _write_cache(path, entries)
    hw = _fresh_capacities(hw, disk_dir)
    return hw.with_caps(gpu_mem, cpu_mem, disk_mem)


def _fresh_capacities(hw: Hardware, disk_dir) -> Hardware:
    vm = psutil.virtual_memory()
    base = Path(disk_dir) if disk_dir and Path(disk_dir).exists() else DEFAULT_CACHE.parent
    disk = psutil.disk_usage(str(base if base.exists() else Path.cwd())).free
    gpu = torch.cuda.get_device_properties(0).total_memory if hw.compute_device == "cuda" else vm.available
    return dataclasses.replace(hw, gpu_mem=int(gpu), cpu_mem=int(vm.available), disk_mem=int(disk),
                               ram_available=int(vm.available))


def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)                                       # atomic: parallel probes never see half a file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.hardware", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help=f"JSON cache file (default {DEFAULT_CACHE})")
    ap.add_argument("--refresh", action="store_true", help="measure again even if a cached probe exists")
    ap.add_argument("--quick", action="store_true", help="short probe (about 3 s), smaller sizes")
    ap.add_argument("--disk-dir", help="where to measure the disk (default: the cache folder)")
    ap.add_argument("--gpu-mem", help="cap for the compute-device tier, e.g. 2GB")
    ap.add_argument("--cpu-mem", help="cap for the CPU tier, e.g. 8GB")
    ap.add_argument("--disk-mem", help="cap for the disk tier, e.g. 50GB")
    ap.add_argument("--json", action="store_true", help="print the Hardware as JSON instead of a summary")
    args = ap.parse_args(argv)
    hw = load_hardware(args.out, refresh=args.refresh, quick=args.quick, gpu_mem=args.gpu_mem,
                       cpu_mem=args.cpu_mem, disk_mem=args.disk_mem, disk_dir=args.disk_dir)
    if args.json:
        print(json.dumps(hw.to_dict(), indent=1))
    else:
        for k, v in hw.summary().items():
            print(f"{k:>10}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
