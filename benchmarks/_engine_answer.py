"""Answer wrangling prompts with the engine the way the flows do; timings as JSON.

    python benchmarks/_engine_answer.py --model qwen2.5-coder-1.5b --prompts p.json --json out.json

Batches of --batch-size prompts through `LLM.generate_text` (greedy, newline stop, length bucketing,
the shared prefix computed once per batch), as `wrangling_tasks.run` does.
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
    p.add_argument("--prompts", required=True, help="JSON file: a list of prompt strings")
    p.add_argument("--max-new", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--policy", default="{}", help="Policy fields as JSON (default: Policy())")
    p.add_argument("--dtype", default="float16", help="storage precision of weights and cache")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from engine import LLM, Policy

    with open(args.prompts) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    llm = LLM.from_pretrained(args.model, policy=Policy.from_dict(json.loads(args.policy)), dtype=args.dtype,
                              progress=False)
    load_s = time.perf_counter() - t0
    answers = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        answers += llm.generate_text(prompts[i: i + args.batch_size], max_new_tokens=args.max_new, stop="\n")
    seconds = time.perf_counter() - t0
    with open(args.json, "w") as f:
        json.dump({"answers": answers, "seconds": seconds, "load_s": load_s, "policy": llm.policy.to_dict(),
                   "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
