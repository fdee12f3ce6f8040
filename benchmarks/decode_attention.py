"""Decode attention over a CPU-tier fp16 KV cache: the C kernel reading it in place against the torch
path (copy to a float32 buffer, then attention over strided views).

    python benchmarks/decode_attention.py [--rounds 5] [--write-doc]

Shapes are OPT-1.3b's (32 heads of 64) at the batch of the engine's decode-heavy rows (48), the
cache laid out as engine/kv_cache.py holds it: one row per position of (2, batch, heads, 64) fp16.
Each case times one decode step's attention over all 24 layers: [past | new token], with the past
`--lengths` positions long. Rounds alternate the two paths, so both see the same machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402

SECTION = "decode_attention"
LAYERS, HEADS, HEAD_DIM = 24, 32, 64


def case(batch: int, past: int, max_len: int):
    """(torch path, kernel path) for one layer's attention, each a function of no arguments."""
    import torch

    from engine import ops
    g = torch.Generator().manual_seed(past)
    rows = torch.randn(max_len, 2, batch, HEADS, HEAD_DIM, generator=g).half()   # the CPU tier's cache
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g)
    new = (torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g), torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g))
    bias = torch.zeros(batch, 1, 1, past + 1)
    buffer = torch.empty(max_len, 2, batch, HEADS, HEAD_DIM)                         # the pool's working copy

    def torch_path():
        kv = buffer[:past].copy_(rows[:past]).permute(1, 2, 3, 0, 4)
        return ops.attend_segments(q, [(kv[0], kv[1]), new], bias, None)

    def kernel_path():
        kv = rows[:past].permute(1, 2, 3, 0, 4)
        return ops.attend_decode(q, [(kv[0], kv[1]), new], bias, None)

    diff = (torch_path() - kernel_path()).abs().max().item()
    return torch_path, kernel_path, diff


def timed(fn) -> float:
    t0 = time.perf_counter()
    for _ in range(LAYERS):
        fn()
    return time.perf_counter() - t0


def render(results: list[dict], batch: int, rounds: int, argv, started: str, loads: tuple, threads: int) -> str:
    head = ["past positions", "cache read a step (fp16)", "torch: copy + attend, s a step", "kernel, s a step",
            "speedup (rounds)", "kernel GB/s", "max abs diff"]
    med = statistics.median
    rows = []
    for r in results:
        ratios = [a / b for a, b in zip(r["torch"], r["kernel"])]
        nbytes = 2 * batch * r["past"] * HEADS * HEAD_DIM * 2 * LAYERS
        rows.append([r["past"], f"{nbytes / 2**30:.2f} GiB", f"{med(r['torch']):.3f}", f"{med(r['kernel']):.3f}",
                     f"**{med(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})",
                     f"{nbytes / med(r['kernel']) / 1e9:.1f}", f"{r['diff']:.1e}"])
    return "\n".join([
        "## Decode attention over the CPU-tier cache (`benchmarks/decode_attention.py`)", "",
        f"Run {started}, engine commit {_doc.engine_commit()}; load average at start {loads[0]}, at end {loads[1]}; "
        f"torch threads {threads}.", "",
        f"Command: `{' '.join(['python benchmarks/decode_attention.py', *argv])}`", "",
        f"One decode step's attention over {LAYERS} layers of OPT-1.3b ({HEADS} heads of {HEAD_DIM}) at batch "
        f"{batch}, the past held as the engine's CPU tier holds it (fp16, one row per position). `torch` = the "
        "path without engine/kernels/attention.c: copy the past into a float32 buffer, then "
        "`ops.attend_segments` over strided views of it. `kernel` = `ops.attend_decode`, reading the fp16 rows "
        f"in place. Medians of {rounds} rounds that alternate the two; the speedup's range is round by round. "
        "Prompt 32 and gen 256 average 160 past positions.", "",
        _doc.md_table(head, rows), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of each path (default 5)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 160, 288], help="past positions")
    p.add_argument("--write-doc", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args(argv)
    import torch

    from engine import kernels
    if kernels.attention() is None:
        raise SystemExit("the attention kernel did not build (is gcc installed? FLEXWRANGLE_KERNELS=0?)")
    started, load0 = time.strftime("%Y-%m-%d %H:%M"), _doc.load_now()
    results = []
    for past in args.lengths:
        torch_path, kernel_path, diff = case(args.batch, past, max(args.lengths))
        r = {"past": past, "torch": [], "kernel": [], "diff": diff}
        for i in range(args.rounds):
            r["torch"].append(timed(torch_path))
            r["kernel"].append(timed(kernel_path))
            print(f"past {past}, round {i + 1}: torch {r['torch'][-1]:.3f} s, kernel {r['kernel'][-1]:.3f} s",
                  flush=True)
        results.append(r)
    md = render(results, args.batch, args.rounds, sys.argv[1:] if argv is None else argv, started,
                (load0, _doc.load_now()), torch.get_num_threads())
    _doc.publish(SECTION, md, args.write_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
