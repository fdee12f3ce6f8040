"""What this machine can do: a probe that measures compute and transfer rates, cached as JSON.

`probe()` measures, with the engine's own code paths where they exist:
  - matmul FLOP/s on the compute device (float32 on CPU, float16 on CUDA), at prefill size and at
    decode shapes (M = 1..512 rows through `ops.linear`, weights cycled through a pool larger than
    the CPU caches, as decode streams them), and int8 products (`Policy.int8_matmul`) at 1, 32 and
    512 rows;
  - prefill attention FLOP/s and decode attention ([past | new] segments) bytes/s, via `ops.attend` / `ops.attend_segments`;
  - the storage -> compute conversion rate (on CPU: float16 -> float32; on CUDA: host -> device),
    memcpy bandwidth, and 4-bit quantize / dequantize rates;
  - disk read and write bandwidth and small-row latency with O_DIRECT through `tiers.DiskFile`;
  - the per-call overhead of a tiny torch op (Python + dispatch);
  - memory capacities: RAM available, disk free, CUDA memory.

`load_hardware()` reuses the cached measurement (`.cache/hardware.json`, keyed by host name and
CPU count) and re-reads the capacities, which change from minute to minute; caps override them.

    python -m engine.hardware [--out FILE] [--refresh] [--quick] [--gpu-mem 2GB --cpu-mem 8GB --disk-mem 50GB]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from . import int8, ops
from .compression import CompressionConfig
from .tiers import DiskFile, Format, MemoryTracker, fmt_bytes, parse_bytes

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "hardware.json"
SMALL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
INT8_M = (1, 32, 512)
IO_THREADS = 1      # torch threads of the engine's I/O thread (schedule.BlockRunner)


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
        return _interpolate(_monotone(sorted(table.items())), rows)

    def int8_matmul_rate(self, rows: int) -> float:
        """Operations/s of `int8.linear` (Policy.int8_matmul) with `rows` rows, as matmul_rate."""
        return _interpolate(_monotone(sorted(self.int8_matmul)), rows)

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


# ---- the probe -----------------------------------------------------------------------------------
def _timeit(fn, reps: int, sync=lambda: None) -> float:
    """Median seconds of fn() over `reps` runs after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def probe(quick: bool = False, disk_dir: str | Path | None = None) -> Hardware:
    """Measure this machine (about 10 s; `quick` about 3 s with smaller sizes)."""
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = 2 if quick else 3
    torch.manual_seed(0)

    # large matmul
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    matmul_flops = 2 * n ** 3 / _timeit(lambda: a @ b, reps, sync)

    # decode-shaped matmuls: weights streamed from memory, as in decode
    k_in, n_out = (1024, 2048) if quick else (2048, 2048)
    pool_bytes = (96 if quick else 192) << 20
    pool = [torch.randn(n_out, k_in, device=dev, dtype=dtype)
            for _ in range(max(2, pool_bytes // (n_out * k_in * dtype.itemsize)))]
    # stream the whole pool while memory-bound (small M); a few weights suffice once compute-bound.
    # Rounds interleave the row counts, so a burst of load elsewhere spoils one sample of each M
    # rather than every sample of one M (the search would otherwise chase a lucky row count).
    shapes = {m: (torch.randn(m, k_in, device=dev, dtype=dtype),
                  pool[: max(2, min(len(pool), int(1.5e9 // (2 * m * k_in * n_out))))]) for m in SMALL_M}
    samples = {m: [] for m in SMALL_M}
    for _ in range(2 if quick else 3):
        for m, (x, use) in shapes.items():
            dt = _timeit(lambda: [ops.linear(x, w) for w in use], 1, sync)
            samples[m].append(2 * m * k_in * n_out * len(use) / dt)
    small = _monotone([(m, sorted(r)[(len(r) - 1) // 2]) for m, r in samples.items()])   # lower median
    # the same for int8 products (Policy.int8_matmul); each call quantizes its input again, as the
    # engine does for every input it has not just quantized
    int8_pool = [int8.quantize(w) for w in pool]
    int8_rates = []
    for m in INT8_M:
        x, use = shapes[m][0], int8_pool[: len(shapes[m][1])]
        dt = _timeit(lambda: [(int8.forget(), ops.linear(x, w)) for w in use], reps, sync)
        int8_rates.append((m, 2 * m * k_in * n_out * len(use) / dt))
    del pool, shapes, int8_pool

    # attention: prefill (causal mask) and decode ([past | new] segments, no concat), as the engine runs them
    s, nh, d = (256, 12, 64) if quick else (512, 16, 64)
    q = torch.randn(1, nh, s, d, device=dev, dtype=dtype)
    mask = torch.ones(1, s, dtype=torch.long, device=dev)
    bias = ops.attention_mask_bias(mask, s, dtype)
    attn_prefill = 4 * s * s * nh * d / _timeit(lambda: ops.attend(q, q, q, bias, None), reps, sync)
    bsz, t = 8, s
    # the cache as a CPU tier holds it: fp16, attended in place by the C kernel (read as stored on CUDA)
    rows = torch.randn(t, 2, bsz, nh, d, device=dev, dtype=torch.float16)
    kv = rows.permute(1, 2, 3, 0, 4)                                    # (2, b, nh, t, d)
    qd, knew = torch.randn(bsz, nh, 1, d, device=dev, dtype=dtype), torch.randn(bsz, nh, 1, d, device=dev, dtype=dtype)
    dmask = torch.ones(bsz, t + 1, dtype=torch.long, device=dev)
    dbias = ops.attention_mask_bias(dmask, 1, dtype)

    def decode_attn():
        return ops.attend_any(qd, [(kv[0], kv[1]), (knew, knew)], dbias, None)
    attn_decode = 2 * bsz * nh * t * d / _timeit(decode_attn, reps * 3, sync)

    # memory: copy, conversions, 4-bit; on the calling thread and on an I/O-like thread (one torch thread)
    elems = (8 if quick else 16) << 20
    rates = _probe_transfers(dev, dtype, elems, (1 if quick else 2) << 20, reps, sync)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(IO_THREADS,)) as io:
        io_rates = io.submit(_probe_transfers, dev, dtype, elems // 2, (1 if quick else 2) << 19, reps, sync).result()

    # disk, O_DIRECT through the engine's own file class
    disk = _probe_disk(disk_dir, (32 if quick else 128) << 20, 2)

    # overhead of one tiny op, and of one decode step of an attention / MLP layer whose math costs
    # nothing (the model's own functions at toy sizes): dispatch, allocation, thread wake-ups
    tiny = torch.randn(16, device=dev, dtype=dtype)
    calls = 2000
    overhead = _timeit(lambda: [tiny.add(tiny) for _ in range(calls)], reps, sync) / calls
    attn_overhead, mlp_overhead = _layer_overheads(dev, dtype, reps, sync)

    host = socket.gethostname()
    vm = psutil.virtual_memory()
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else vm.available
    return Hardware(
        host=host, cpu_count=os.cpu_count() or 1, torch_threads=torch.get_num_threads(),
        compute_device=dev.type, compute_dtype=str(dtype).replace("torch.", ""),
        matmul_flops=matmul_flops, matmul_rows=n, matmul_small_m=tuple(small),
        int8_matmul=tuple(_monotone(int8_rates)), attn_prefill_flops=attn_prefill,
        attn_decode_elems_per_s=attn_decode, **rates, **{f"io_{k}": v for k, v in io_rates.items()
                                                         if not k.startswith(("h2d", "d2h"))},
        io_threads=IO_THREADS, op_overhead_s=overhead, attn_layer_overhead_s=attn_overhead,
        mlp_layer_overhead_s=mlp_overhead, gpu_mem=int(gpu_mem), cpu_mem=int(vm.available),
        ram_available=int(vm.available),
        disk_mem=int(disk["free"]), disk_read_bytes_per_s=disk["read"], disk_write_bytes_per_s=disk["write"],
        disk_read_latency_s=disk["read_latency"], disk_write_latency_s=disk["write_latency"],
        disk_direct=disk["direct"], quick=quick, probe_seconds=time.perf_counter() - t_start,
        measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))


def _layer_overheads(dev, dtype, reps: int, sync) -> tuple[float, float]:
    """Seconds of one decode step through an OPT attention layer (past and new keys as segments) and an MLP
    layer at toy sizes, where the arithmetic is negligible: what every layer pays regardless of size."""
    from .config import ModelConfig
    from .models import opt
    cfg = ModelConfig(family="opt", name="probe", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4,
                      ffn_dim=256, max_positions=64)
    weights = lambda kind: {s.name: torch.randn(s.shape, device=dev, dtype=dtype) * 0.02
                            for s in opt.layer_weights(cfg, kind)}
    wa, wm = weights("attn"), weights("mlp")
    b, t = 4, 16
    h = torch.randn(b, 1, cfg.hidden_size, device=dev, dtype=dtype)
    positions = torch.full((b, 1), t, device=dev)
    past = torch.randn(t, 2, b, cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype).permute(1, 2, 3, 0, 4)
    mask = torch.ones(b, t + 1, dtype=torch.long, device=dev)

    def attn():
        q, k, v = opt.attn_qkv(wa, h, positions, cfg)
        bias = ops.attention_mask_bias(mask, 1, dtype)
        o = ops.attend_segments(q, [(past[0], past[1]), (k, v)], bias, opt.ATTN_SCALE)
        return opt.attn_out(wa, h, o, cfg)
    calls = 50
    attn_s = _timeit(lambda: [attn() for _ in range(calls)], reps, sync) / calls
    mlp_s = _timeit(lambda: [opt.mlp(wm, h, cfg) for _ in range(calls)], reps, sync) / calls
    return attn_s, mlp_s


def _probe_transfers(dev, dtype, elems: int, quant_elems: int, reps: int, sync) -> dict:
    """Copy, widen (storage -> compute dtype, into a reused buffer as the engine's pool does), narrow,
    and 4-bit (de)quantization rates with the calling thread's torch threads (CPU data for the 4-bit
    formats; on CUDA only the copies are device-side)."""
    cuda = dev.type == "cuda"
    src = torch.randn(elems, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    out = {"memcpy_bytes_per_s": elems * dtype.itemsize / _timeit(lambda: dst.copy_(src), reps, sync)}
    half = src.to("cpu", torch.float16)
    if cuda:
        pinned = half.pin_memory()
        out["h2d_bytes_per_s"] = half.numel() * 2 / _timeit(lambda: pinned.to(dev, non_blocking=True), reps, sync)
        dev_half = pinned.to(dev)
        out["d2h_bytes_per_s"] = dev_half.numel() * 2 / _timeit(lambda: dev_half.to("cpu"), reps, sync)
        out["convert_elems_per_s"], out["narrow_elems_per_s"] = out["h2d_bytes_per_s"] / 2, out["d2h_bytes_per_s"] / 2
    else:
        out["h2d_bytes_per_s"] = out["d2h_bytes_per_s"] = 0.0
        out["convert_elems_per_s"] = elems / _timeit(lambda: dst.copy_(half), reps)
        out["narrow_elems_per_s"] = elems / _timeit(lambda: src.to(torch.float16), reps)
    del src, dst, half
    # 4-bit through the engine's own formats: weights grouped along the output dimension, the cache
    # along the head dimension (rows of (2, n, heads, 64)), decoded into reused buffers
    w_fmt = Format(torch.float16, quant=CompressionConfig(num_bits=4, group_size=64, group_dim=0))
    w = torch.randn(1, quant_elems // 1024, 1024, dtype=torch.float32)
    w_raw, w_buf = w_fmt.encode(w).to(dev), torch.empty(w.shape, device=dev, dtype=dtype)
    out["dequant_elems_per_s"] = w.numel() / _timeit(
        lambda: w_fmt.decode(w_raw, w.shape[1:], dtype, out=w_buf), reps, sync)
    c_fmt = Format(torch.float16, quant=CompressionConfig(num_bits=4, group_size=64, group_dim=-1))
    c = torch.randn(quant_elems // (2 * 8 * 16 * 64), 2, 8, 16, 64, dtype=torch.float32)
    c_raw, c_buf = c_fmt.encode(c).to(dev), torch.empty(c.shape, device=dev, dtype=dtype)
    out["cache_dequant_elems_per_s"] = c.numel() / _timeit(
        lambda: c_fmt.decode(c_raw, c.shape[1:], dtype, out=c_buf), reps, sync)
    c = c.to(dev, dtype)
    out["quant_elems_per_s"] = c.numel() / _timeit(lambda: c_fmt.encode(c), reps, sync)
    return out


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


def _monotone(table: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Make the small-M table non-decreasing in M (noise on a loaded machine can invert neighbours)."""
    out, best = [], 0.0
    for m, r in table:
        best = max(best, r)
        out.append((m, best))
    return out


def _probe_disk(disk_dir, nbytes: int, reps: int) -> dict:
    base = Path(disk_dir) if disk_dir else DEFAULT_CACHE.parent
    base.mkdir(parents=True, exist_ok=True)
    tracker = MemoryTracker("disk", 1 << 62)
    row = 4 << 20                                               # 4 MiB rows: a layer-sized transfer
    rows = max(1, nbytes // row)
    with tempfile.TemporaryDirectory(dir=base, prefix="probe-") as tmp:
        big = DiskFile(Path(tmp) / "big.bin", row, rows, tracker)
        small = DiskFile(Path(tmp) / "small.bin", 4096, 64, tracker)
        try:
            data = torch.randint(0, 255, (rows, row), dtype=torch.uint8)
            write = rows * row / _timeit(lambda: big.write_rows(0, data), reps)
            read = rows * row / _timeit(lambda: _read(big, 0, rows), reps)
            one = torch.zeros(1, 4096, dtype=torch.uint8)
            small.write_rows(0, torch.zeros(64, 4096, dtype=torch.uint8))
            write_lat = _median_op([lambda i=i: small.write_rows(i, one) for i in range(64)])
            read_lat = _median_op([lambda i=i: _read(small, i, 1) for i in range(64)])
            direct = big.direct
        finally:
            big.close()
            small.close()
        free = psutil.disk_usage(str(base)).free
    return {"read": read, "write": write, "read_latency": read_lat, "write_latency": write_lat,
            "direct": direct, "free": free}


def _read(f: DiskFile, start: int, n: int) -> None:
    """Read rows and hand any staging buffer back (DiskFile.read_rows may return (view, buffer))."""
    got = f.read_rows(start, n)
    if isinstance(got, tuple):
        from .tiers import STAGING
        STAGING.put(got[1])


def _median_op(ops) -> float:
    """Median seconds of single small operations: one stall on a shared disk must not set the latency."""
    times = []
    for op in ops:
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
