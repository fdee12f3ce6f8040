"""The measurements behind engine.hardware.Hardware, with the engine's own code paths where they exist:

  - matmul FLOP/s on the compute device (float32 on CPU, float16 on CUDA), at prefill size and at
    decode shapes (M = 1..512 rows through `ops.linear`, weights cycled through a pool larger than
    the CPU caches, as decode streams them), and int8 products (`Policy.int8_matmul`) at 1, 32 and
    512 rows;
  - prefill attention FLOP/s and decode attention ([past | new] segments) bytes/s, via `ops.attend`
    / `ops.attend_segments`;
  - the storage -> compute conversion rate (on CPU: float16 -> float32; on CUDA: host -> device),
    memcpy bandwidth, and 4-bit quantize / dequantize rates;
  - disk read and write bandwidth and small-row latency with O_DIRECT through `tiers.DiskFile`;
  - the per-call overhead of a tiny torch op (Python + dispatch);
  - memory capacities: RAM available, disk free, CUDA memory.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from . import int8, ops
from .compression import CompressionConfig
from .tiers import DiskFile, Format, MemoryTracker

SMALL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
INT8_M = (1, 32, 512)
IO_THREADS = 1      # torch threads of the engine's I/O thread (schedule.BlockRunner)


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


def measure(quick: bool = False, disk_dir: str | Path | None = None,
            default_disk_dir: Path | None = None) -> dict:
    """The fields of a Hardware, measured on this machine (about 10 s; `quick` about 3 s with
    smaller sizes). The disk is measured in `disk_dir`, else in `default_disk_dir`."""
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
    small = monotone([(m, sorted(r)[(len(r) - 1) // 2]) for m, r in samples.items()])   # lower median
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
    disk = _probe_disk(disk_dir or default_disk_dir or tempfile.gettempdir(), (32 if quick else 128) << 20, 2)

    # overhead of one tiny op, and of one decode step of an attention / MLP layer whose math costs
    # nothing (the model's own functions at toy sizes): dispatch, allocation, thread wake-ups
    tiny = torch.randn(16, device=dev, dtype=dtype)
    calls = 2000
    overhead = _timeit(lambda: [tiny.add(tiny) for _ in range(calls)], reps, sync) / calls
    attn_overhead, mlp_overhead = _layer_overheads(dev, dtype, reps, sync)


    host = socket.gethostname()
    vm = psutil.virtual_memory()
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else vm.available
    return dict(
        host=host, cpu_count=os.cpu_count() or 1, torch_threads=torch.get_num_threads(),
        compute_device=dev.type, compute_dtype=str(dtype).replace("torch.", ""),
        matmul_flops=matmul_flops, matmul_rows=n, matmul_small_m=tuple(small),
        int8_matmul=tuple(monotone(int8_rates)), attn_prefill_flops=attn_prefill,
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


def _probe_disk(disk_dir, nbytes: int, reps: int) -> dict:
    base = Path(disk_dir)
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


def monotone(table: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Make a (rows, rate) table non-decreasing in rows (noise on a loaded machine can invert neighbours)."""
    out, best = [], 0.0
    for m, r in table:
        best = max(best, r)
        out.append((m, best))
    return out
