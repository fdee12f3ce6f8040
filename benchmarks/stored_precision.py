"""What the stored precision of a converted GGUF model costs: logits error, greedy agreement, F1, bytes.

The converter dequantizes a GGUF file once into float32 safetensors (exact: transformers' own GGUF
load gives the same numbers). The engine then stores weights and KV cache in the policy's precision
and computes in float32. This script loads the model once per storage setting and compares, on the
project's own entity-matching prompts, each setting against float32 storage:

  * last-position logits on the first --logit-rows prompts: max and mean absolute error, and how
    often the top token differs;
  * greedy answers (3 tokens, newline stop) on every test pair: how many differ, and the F1.

    .venv/bin/python benchmarks/stored_precision.py [--model qwen2.5-coder-1.5b] [--dataset Beer] [--write-doc]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._doc import engine_commit, load_now, publish  # noqa: E402

SECTION = "stored_precision"
SETTINGS = {     # label -> (storage dtype, Policy fields)
    "float32": ("float32", {}),
    "float16 (default)": ("float16", {}),
    "bfloat16": ("bfloat16", {}),
    "4-bit weights": ("float16", {"compress_weight": True}),
    "4-bit cache": ("float16", {"compress_cache": True}),
    "4-bit weights + 4-bit cache": ("float16", {"compress_weight": True, "compress_cache": True}),
    # the same 4-bit weights made int8 rows per layer per block, int8 products (not float32 compute)
    "4-bit weights + 4-bit cache, int8 products": ("float16", {"compress_weight": True, "compress_cache": True,
                                                               "int8_matmul": True}),
    # the same float16 numbers held as float16 in the cpu tier and widened per layer, each layer's
    # widening shared by a block of 8 micro-batches: half the RAM of the compute-ready copy
    "float16 in the cpu tier, block 8x8": ("float16", {"w_gpu_percent": 0, "w_cpu_percent": 100,
                                                        "gpu_batch_size": 8, "num_gpu_batches": 8}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dataset", default="Beer")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--logit-rows", type=int, default=24)
    ap.add_argument("--limit", type=int, default=None, help="first N test pairs for the greedy answers")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)

    from engine import LLM, Policy
    from wrangling_tasks import get_task, load_benchmark, prepare

    task = get_task("entity-matching")
    prep = prepare(task, load_benchmark("entity-matching", args.dataset, "test"), None, k=args.k, limit=args.limit)
    prompts, labels = list(prep.items["prompt"]), list(prep.items["label"])
    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    rows, base_logits, base_answers = [], None, None
    for label, (dtype, fields) in SETTINGS.items():
        llm = LLM.from_pretrained(args.model, dtype=dtype, policy=Policy(**{"gpu_batch_size": 16, **fields}),
                                  progress=False)
        ids = [llm.encode(p) for p in prompts[: args.logit_rows]]
        logits = llm.logits(ids)
        t0 = time.perf_counter()
        answers = llm.generate_text(prompts, max_new_tokens=3, stop="\n")
        seconds = time.perf_counter() - t0
        weight_bytes = sum(llm.weight_bytes().values())
        llm.close()
        del llm
        gc.collect()
        if base_logits is None:
            base_logits, base_answers = logits, answers
        err = (logits - base_logits).abs()
        rows.append(dict(
            label=label, max_err=err.max().item(), mean_err=err.mean().item(),
            top1_diff=int((logits.argmax(-1) != base_logits.argmax(-1)).sum()),
            answers_diff=sum(a != b for a, b in zip(answers, base_answers)),
            f1=task.score([task.parse(a) for a in answers], labels)["f1"],
            weight_gib=weight_bytes / 2**30, rows_per_s=len(prompts) / seconds))
        r = rows[-1]
        print(f"{label}: logits max err {r['max_err']:.4f}, mean {r['mean_err']:.5f}, top-1 differs on "
              f"{r['top1_diff']}/{len(ids)}; answers differ on {r['answers_diff']}/{len(prompts)}; "
              f"F1 {r['f1']:.3f}; weights {r['weight_gib']:.2f} GiB; {r['rows_per_s']:.2f} rows/s", flush=True)

    lines = [
        f"### Stored precision of `{args.model}` (`benchmarks/stored_precision.py`)", "",
        f"The GGUF file converted once to float32 (exact), then stored by the engine in each precision below, "
        "computing in float32 (on the CPU the gpu tier holds float32 copies rounded to the storage precision, "
        "the cpu tier the storage precision itself), except the row marked int8 products. A 4-bit cache stores "
        f"each sequence's keys and values normalised per channel (kv_cache.channel_norm). {args.dataset} test pairs at k = {args.k} ({len(prompts)} prompts; logits on the "
        f"first {args.logit_rows}), each setting against float32 storage. Run {started}, engine at commit {commit}; "
        f"load average at the end: {load_now()}. Command: `.venv/bin/python benchmarks/stored_precision.py"
        f"{' --model ' + args.model if args.model != 'qwen2.5-coder-1.5b' else ''}`.", "",
        "| storage | logits max abs err | logits mean abs err | top-1 differs | greedy answers differ | F1 | "
        "weights held | rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['max_err']:.4f} | {r['mean_err']:.5f} | {r['top1_diff']} / "
                     f"{args.logit_rows} | {r['answers_diff']} / {len(prompts)} | {100 * r['f1']:.1f} | "
                     f"{r['weight_gib']:.2f} GiB | {r['rows_per_s']:.2f} |")
    md = "\n".join(lines) + "\n"
    publish(SECTION, md, args.write_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
