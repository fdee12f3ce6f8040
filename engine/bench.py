"""Benchmark CLI in the style of FlexGen's flex_opt: one block, measured end to end.

    python -m engine.bench --model opt-1.3b --dummy --percent 0 100 100 0 100 0 \\
        --gpu-batch-size 8 --num-gpu-batches 4 --prompt-len 512 --gen-len 32 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .compression import CompressionConfig
from .generate import LLM
from .policy import Policy
from .tiers import fmt_bytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Throughput = generated tokens / (prefill time + decode time), measured, never projected.")
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file, smollm2-135m, or an OPT "
                   "size (opt-125m ... opt-175b) with --dummy")
    p.add_argument("--dummy", action="store_true", help="random weights of the named shape (no checkpoint)")
    p.add_argument("--offload-dir", default="offload", help="folder for the disk tier")
    p.add_argument("--percent", nargs="+", default=["100", "0", "100", "0", "100", "0"],
                   metavar="P", help="w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu (disk = remainder), "
                   "or 'auto' for the LP policy search")
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--overlap", type=int, choices=(0, 1), default=1)
    p.add_argument("--sep-layer", type=int, choices=(0, 1), default=1)
    p.add_argument("--cpu-cache-compute", action="store_true")
    p.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weights")
    p.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--dtype", default="float16", help="storage dtype of weights and cache")
    p.add_argument("--gpu-mem", help="compute-device budget, e.g. 2GB (on CPU: a byte budget in RAM)")
    p.add_argument("--cpu-mem", help="CPU RAM budget, e.g. 8GB")
    p.add_argument("--disk-mem", help="disk budget, e.g. 100GB")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--log-file", help="append one JSON line of results to this file")
    p.add_argument("--no-progress", action="store_true")
    return p


def policy_from_args(args) -> Policy | str:
    extra = dict(
        gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches, overlap=bool(args.overlap),
        sep_layer=bool(args.sep_layer),
        cpu_cache_compute=args.cpu_cache_compute, compress_weight=args.compress_weight,
        compress_cache=args.compress_cache,
        comp_weight_config=CompressionConfig(4, args.group_size, 0),
        comp_cache_config=CompressionConfig(4, args.group_size, -1))
    if args.percent == ["auto"]:
        return "auto"
    return Policy.from_percent(args.percent, **extra)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = policy_from_args(args)
    t0 = time.perf_counter()
    load = LLM.from_pretrained
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:     # under torchrun: this rank's pipeline stage
        from .distributed import PipelineLLM
        load = PipelineLLM.from_pretrained
    llm = load(args.model, policy=policy, offload_dir=args.offload_dir, dummy=args.dummy,
               dtype=args.dtype, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem,
               disk_mem=args.disk_mem, progress=not args.no_progress, **_auto_hints(args, policy))
    load_s = time.perf_counter() - t0
    cfg, pol = llm.config, llm.policy
    n = pol.block_size * getattr(llm, "blocks_in_flight", 1)     # a pipeline keeps several blocks in flight
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, cfg.vocab_size, (n, args.prompt_len), generator=g).tolist()
    llm.generate(prompts, max_new_tokens=args.gen_len, ignore_eos=True)
    s = llm.last_stats
    gen_tokens = n * args.gen_len
    result = {
        "model": cfg.name, "dummy": args.dummy, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "block_size": n, "model_bytes": cfg.num_params() * 2,
        "held_weight_bytes": llm.weight_bytes(),
        "cache_bytes": cfg.cache_bytes(n, args.prompt_len + args.gen_len, 2),
        "hidden_bytes": cfg.hidden_bytes(n, args.prompt_len, 2),
        "peak_bytes": s["peak_bytes"], "capacity_bytes": llm.memory_report()["capacity"],
        "peak_rss_bytes": s["peak_rss_bytes"], "load_s": load_s,
        "prefill_s": s["prefill_s"], "decode_s": s["decode_s"],
        "prefill_tokens_per_s": n * args.prompt_len / s["prefill_s"],
        "decode_tokens_per_s": n * (args.gen_len - 1) / s["decode_s"] if s["decode_s"] else 0.0,
        "total_tokens_per_s": gen_tokens / (s["prefill_s"] + s["decode_s"]),
        "policy": pol.to_dict(), "threads": torch.get_num_threads(),
    }
    if "ranks" in s:
        result["pipeline"] = {"world_size": len(s["ranks"]), "ranks": s["ranks"]}
    if getattr(llm, "policy_choice", None) is not None:
        result["predicted"] = llm.policy_choice
    llm.close()
    return result


def _auto_hints(args, policy) -> dict:
    return {"workload": (args.prompt_len, args.gen_len)} if policy == "auto" else {}


def report(r: dict) -> str:
    p = r["policy"]
    lines = [
        f"model {r['model']}{' (dummy weights)' if r['dummy'] else ''}: {fmt_bytes(r['model_bytes'])} in fp16, "
        f"cache {fmt_bytes(r['cache_bytes'])}, hidden {fmt_bytes(r['hidden_bytes'])}",
        f"policy: batch {p['gpu_batch_size']} x {p['num_gpu_batches']}, weights {p['w_gpu_percent']:g}/"
        f"{p['w_cpu_percent']:g}, cache {p['cache_gpu_percent']:g}/{p['cache_cpu_percent']:g}, act "
        f"{p['act_gpu_percent']:g}/{p['act_cpu_percent']:g} (gpu/cpu %, disk the rest), overlap {p['overlap']}, "
        f"compress w={p['compress_weight']} cache={p['compress_cache']}",
        "peak memory: " + ", ".join(f"{t} {fmt_bytes(b)}" for t, b in r["peak_bytes"].items())
        + f", process RSS {fmt_bytes(r['peak_rss_bytes'])}",
        f"prefill: {r['prefill_s']:.3f} s, {r['prefill_tokens_per_s']:.1f} tokens/s",
        f"decode:  {r['decode_s']:.3f} s, {r['decode_tokens_per_s']:.1f} tokens/s",
        f"total:   {r['total_tokens_per_s']:.2f} tokens/s ({r['block_size']} x {r['gen_len']} generated tokens)",
    ]
    if "pipeline" in r:
        busy = ", ".join(f"rank {i} {x['busy_s']:.2f} s" for i, x in enumerate(r["pipeline"]["ranks"]))
        lines.append(f"pipeline: {r['pipeline']['world_size']} stages; busy time {busy} of "
                     f"{r['prefill_s'] + r['decode_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    r = run(args)
    if int(os.environ.get("RANK", "0")) != 0:          # under torchrun, rank 0 reports
        return 0
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2, default=str)
    if args.log_file:
        with open(args.log_file, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
