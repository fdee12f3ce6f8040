"""Candidate quantized products on this CPU, before building one: rates at the 1.5B's MLP shapes.

For 1, 32 and 512 rows of activations against Qwen2.5-Coder-1.5B's up projection (1536 -> 8960) and
down projection (8960 -> 1536), the best of a few runs of:

  * float32 `x @ W.T` (what the engine computes today);
  * `torch._int_mm` on int8 activations and int8 weights, plus the cost of quantizing the activations
    per row (absmax) and rescaling the int32 result: W8A8 as a whole;
  * `torch.ops.aten._weight_int8pack_mm`: float activations, int8 weights with a scale per channel.

Rates count 2*M*K*N operations per product. Nothing here checks accuracy: it says which paths are worth
building and measuring for F1 (issue: compute on quantized weights).

    .venv/bin/python benchmarks/int8_matmul.py [--write-doc]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._doc import engine_commit, load_now, publish  # noqa: E402

SECTION = "int8_matmul"
SHAPES = {"up (1536 -> 8960)": (1536, 8960), "down (8960 -> 1536)": (8960, 1536)}
ROWS = (1, 32, 512)


def best_of(fn, runs: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def w8a8(x, w_int8_t, w_scale):
    """int8 product with per-row activation scales: the whole path, quantization included."""
    import torch
    a_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0         # (M, 1)
    xq = torch.round(x / a_scale).to(torch.int8)                                  # (M, K)
    return torch._int_mm(xq, w_int8_t).float() * a_scale * w_scale               # (M, N)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)

    import torch

    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    rows = []
    for label, (k, n) in SHAPES.items():
        w = torch.randn(n, k) * 0.02                                              # (N, K) like nn.Linear
        w_scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0                     # (N,)
        w_int8 = torch.round(w / w_scale[:, None]).to(torch.int8)                 # (N, K)
        w_int8_t = w_int8.t().contiguous()                                        # (K, N) for _int_mm
        for m in ROWS:
            x = torch.randn(m, k)
            ops = 2 * m * k * n
            rate = {"float32": ops / best_of(lambda: x @ w.t())}
            rate["W8A8 _int_mm"] = ops / best_of(lambda: w8a8(x, w_int8_t, w_scale))
            try:
                rate["int8 weights, float activations"] = ops / best_of(
                    lambda: torch.ops.aten._weight_int8pack_mm(x, w_int8, w_scale))
            except (RuntimeError, AttributeError) as e:    # not built for this CPU / dtype
                rate["int8 weights, float activations"] = float("nan")
                print(f"_weight_int8pack_mm: {e}")
            rows.append((label, m, rate))
            print(label, m, {k: f"{v / 1e9:.0f} G/s" for k, v in rate.items()}, flush=True)

    systems = list(rows[0][2])
    lines = ["### Quantized products on this CPU (`benchmarks/int8_matmul.py`)", "",
             f"Qwen2.5-Coder-1.5B's MLP shapes, random weights, {torch.get_num_threads()} threads, best of 5. "
             "Rates in G operations/s (2·M·K·N per product); W8A8 includes quantizing the activations per row and "
             "rescaling the int32 result. Speed only: none of these paths is checked for "
             f"accuracy here. Run {started}, engine at commit {commit}; load average at the end: {load_now()}. "
             "Command: `.venv/bin/python benchmarks/int8_matmul.py`.", "",
             "| weight | rows | " + " | ".join(systems) + " | W8A8 / float32 |",
             "|---|---:|" + "---:|" * (len(systems) + 1)]
    for label, m, rate in rows:
        lines.append(f"| {label} | {m} | " + " | ".join(f"{rate[s] / 1e9:.0f}" for s in systems)
                     + f" | {rate['W8A8 _int_mm'] / rate['float32']:.1f}× |")
    md = "\n".join(lines) + "\n"
    publish(SECTION, md, args.write_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
