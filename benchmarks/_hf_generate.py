"""One transformers `generate` run (in RAM, or under Accelerate disk offload), timed like engine.bench.

    python benchmarks/_hf_generate.py --model DIR --batch 8 --prompt-len 512 --gen-len 32 --json out.json
    python benchmarks/_hf_generate.py --model DIR ... --max-memory 1GiB --offload-folder DIR   # Accelerate

Weights are loaded as float32 (fp16/bf16 matmuls crawl on this CPU, REFERENCE §5). With
--max-memory, `from_pretrained(device_map="auto", max_memory={"cpu": CAP}, offload_folder=...)`
is Accelerate's big-model inference: modules past the cap are offloaded to disk and streamed in
before each forward by Accelerate's hooks. Prompts are the same random ids engine.bench uses
(seed 0, ids in [10, vocab)); every sequence generates exactly gen-len tokens (min_new_tokens).
Prefill time is the time to the first new token (a streamer timestamps it); decode is the rest.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter

import torch


class _FirstToken:
    """A generate() streamer that records when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:        # call 1 is the prompt, call 2 the first token
            self.first = time.perf_counter()

    def end(self):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--max-memory", help="Accelerate: CPU memory cap for weights, e.g. 1GiB")
    p.add_argument("--offload-folder")
    p.add_argument("--ids", help="JSON file of prompts (lists of token ids, equal lengths) instead of random ids")
    p.add_argument("--save-tokens", action="store_true", help="put the new token ids in the JSON")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    kw = dict(dtype=torch.float32)
    if args.max_memory:
        kw.update(device_map="auto", max_memory={"cpu": args.max_memory}, offload_folder=args.offload_folder)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kw).eval()
    load_s = time.perf_counter() - t0
    device_map = getattr(model, "hf_device_map", {"": "cpu"})
    placement = dict(Counter(device_map.values()))
    # bytes of the weights Accelerate homes on disk, in the checkpoint's dtype (fp16 here): the
    # bytes one forward pass would have to read if the page cache did not hold the file
    with open(f"{args.model}/config.json") as f:
        saved = json.load(f)
    ckpt_itemsize = 2 if "16" in str(saved.get("dtype") or saved.get("torch_dtype")) else 4
    disk_params = sum(p.numel() for name, where in device_map.items() if where == "disk"
                      for p in (model.get_submodule(name) if name else model).parameters())
    vocab = model.config.vocab_size
    if args.ids:
        with open(args.ids) as f:
            ids = torch.tensor(json.load(f), dtype=torch.long)
        if ids.shape != (args.batch, args.prompt_len):
            raise SystemExit(f"{args.ids}: shape {tuple(ids.shape)}, expected ({args.batch}, {args.prompt_len})")
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, vocab, (args.batch, args.prompt_len), generator=g)
    streamer = _FirstToken()
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.gen_len, min_new_tokens=args.gen_len,
                             pad_token_id=model.config.pad_token_id, streamer=streamer)
        end = time.perf_counter()
    assert out.shape[1] == args.prompt_len + args.gen_len, out.shape
    prefill_s = (streamer.first or end) - t
    decode_s = end - (streamer.first or end)
    n = args.batch
    result = {
        "system": "accelerate" if args.max_memory else "transformers", "batch": n,
        "prompt_len": args.prompt_len, "gen_len": args.gen_len, "load_s": load_s,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tokens_per_s": n * args.prompt_len / prefill_s,
        "decode_tokens_per_s": n * (args.gen_len - 1) / decode_s if decode_s else 0.0,
        "total_tokens_per_s": n * args.gen_len / (end - t),
        "placement": placement, "disk_weight_bytes": disk_params * ckpt_itemsize, "max_memory": args.max_memory, "threads": torch.get_num_threads(),
        "peak_rss_bytes_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.save_tokens:
        result["tokens"] = out[:, args.prompt_len:].tolist()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
