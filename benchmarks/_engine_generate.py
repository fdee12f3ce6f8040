"""One engine `generate` run over given prompts, timed like _hf_generate.py (the engine's own split).

    python benchmarks/_engine_generate.py --model smollm2-135m --ids prompts.json --gen-len 16 --json out.json

Policy: everything on the compute tier unless --percent says otherwise; one micro-batch of all
prompts unless --gpu-batch-size is given. Greedy, exactly gen-len tokens per prompt (ignore_eos).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True, help="JSON file: a list of prompts (token-id lists)")
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0])
    p.add_argument("--gpu-batch-size", type=int)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--offload-dir")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import torch
    from engine import LLM, Policy
    prompts = json.loads(Path(args.ids).read_text())
    pol = Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size or len(prompts), num_gpu_batches=1)
    t0 = time.perf_counter()
    llm = LLM.from_pretrained(args.model, policy=pol, offload_dir=args.offload_dir, dtype=args.dtype,
                              progress=False)
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    new = llm.generate(prompts, max_new_tokens=args.gen_len, ignore_eos=True)
    wall = time.perf_counter() - t
    s = llm.last_stats
    n, plen = len(prompts), max(len(x) for x in prompts)
    result = {
        "system": "engine", "batch": n, "prompt_len": plen, "gen_len": args.gen_len, "load_s": load_s,
        "prefill_s": s["prefill_s"], "decode_s": s["decode_s"], "generate_wall_s": wall,
        "prefill_tokens_per_s": sum(len(x) for x in prompts) / s["prefill_s"],
        "decode_tokens_per_s": n * (args.gen_len - 1) / s["decode_s"] if s["decode_s"] else 0.0,
        "total_tokens_per_s": n * args.gen_len / wall, "policy": pol.to_dict(), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "tokens": new,
        "peak_rss_bytes_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    llm.close()
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "policy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
