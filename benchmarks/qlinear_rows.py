"""How many rows the 4-bit C kernel should take: x @ W.T straight from the packed weight
(engine/kernels/qlinear.c) against dequantizing W whole once and one MKL matmul by the float copy.

    python benchmarks/qlinear_rows.py [--rounds 7] [--rows 16 64 128 256 512] [--write-doc]

The weight is OPT-1.3b's fc1 (8192 x 2048, 4-bit, groups of 64 along the output dim), as the engine
holds it. Where the kernel wins with one micro-batch (the weight used once per load) sets
compression.KERNEL_MAX_ROWS; where it still wins against the matmul alone (what every further
micro-batch of a block pays once the copy exists) sets SHARED_MAX_ROWS. Best of `--rounds` each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402

SECTION = "qlinear_rows"
SHAPE = (8192, 2048)


def best_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def measure(rows_list: list[int], rounds: int) -> list[dict]:
    import torch

    from engine import compression
    from engine.compression import CompressionConfig, QuantizedWeight, dequantize, padded_shape, quantize
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
    q = quantize(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).mul_(0.02), cfg)
    buf = torch.empty(padded_shape(SHAPE, cfg))
    w = dequantize(q, torch.float32, buf)
    limit = compression.KERNEL_MAX_ROWS
    compression.KERNEL_MAX_ROWS = max(rows_list)        # let the kernel take every row count measured
    try:
        out = []
        for rows in rows_list:
            x = torch.randn(rows, SHAPE[1])
            got = compression.linear(x, QuantizedWeight(q, torch.empty(0)))
            diff = (got - torch.nn.functional.linear(x, w)).abs().max().item()
            r = {"rows": rows, "diff": diff,
                 "kernel": best_ms(lambda: compression.linear(x, QuantizedWeight(q, torch.empty(0))), rounds),
                 "dequant": best_ms(lambda: dequantize(q, torch.float32, buf), rounds),
                 "matmul": best_ms(lambda: torch.nn.functional.linear(x, w), rounds)}
            print(f"rows {rows}: kernel {r['kernel']:.1f} ms, dequantize {r['dequant']:.1f} + matmul "
                  f"{r['matmul']:.1f} ms", flush=True)
            out.append(r)
    finally:
        compression.KERNEL_MAX_ROWS = limit
    return out


def render(results: list[dict], rounds: int, argv, started: str, loads: tuple, threads: int) -> str:
    from engine import compression
    head = ["rows", "kernel, ms", "dequantize + matmul, ms", "kernel / (dequantize + matmul)",
            "matmul alone, ms", "kernel GFLOP/s", "max abs diff"]
    flops = 2 * SHAPE[0] * SHAPE[1]
    rows = [[r["rows"], f"{r['kernel']:.1f}", f"{r['dequant']:.1f} + {r['matmul']:.1f}",
             f"**{r['kernel'] / (r['dequant'] + r['matmul']):.2f}**", f"{r['matmul']:.1f}",
             f"{flops * r['rows'] / r['kernel'] / 1e6:.0f}", f"{r['diff']:.1e}"] for r in results]
    return "\n".join([
        "## How many rows the 4-bit kernel takes (`benchmarks/qlinear_rows.py`)", "",
        f"Run {started}, engine commit {_doc.engine_commit()}; load average at start {loads[0]}, at end {loads[1]}; "
        f"torch threads {threads}.", "",
        f"Command: `{' '.join(['python benchmarks/qlinear_rows.py', *argv])}`", "",
        f"OPT-1.3b's fc1 ({SHAPE[0]} x {SHAPE[1]}, 4-bit, groups of 64), best of {rounds}. `kernel` = "
        "engine/kernels/qlinear.c multiplying straight from the packed values; `dequantize + matmul` = the "
        "float copy made once, then MKL. A ratio below 1 means the kernel wins for a weight used once (one "
        "micro-batch); `matmul alone` is what each further micro-batch of a block pays once the copy exists. "
        f"The engine uses the kernel up to {compression.KERNEL_MAX_ROWS} rows for one micro-batch and "
        f"{compression.SHARED_MAX_ROWS} for several (engine/compression.py).", "",
        _doc.md_table(head, rows), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed runs of each, best kept (default 7)")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256, 512], help="rows of x")
    p.add_argument("--write-doc", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args(argv)
    import torch

    from engine import kernels
    if kernels.qlinear() is None:
        raise SystemExit("the qlinear kernel did not build (is gcc installed? FLEXWRANGLE_KERNELS=0?)")
    started, load0 = time.strftime("%Y-%m-%d %H:%M"), _doc.load_now()
    results = measure(args.rows, args.rounds)
    md = render(results, args.rounds, sys.argv[1:] if argv is None else argv, started,
                (load0, _doc.load_now()), torch.get_num_threads())
    _doc.publish(SECTION, md, args.write_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
