"""Answer wrangling prompts with llama.cpp (llama-cpp-python) on a GGUF file; timings as JSON.

    <python with llama_cpp> benchmarks/_llamacpp_answer.py --gguf model.gguf --prompts p.json --json out.json

Imports only the standard library and llama_cpp, so it runs in a throwaway virtualenv that holds
llama-cpp-python and nothing of this project. Prompts are answered one after another: llama-cpp-python
keeps the longest common token prefix of consecutive prompts in its KV cache, so the shared few-shot
prefix is computed once, which is llama.cpp's best mode for this workload. Greedy, newline stop,
flash attention off (it changes outputs).

`--requantize Q4_0` answers with a copy of the file requantized to that type (made once with
llama.cpp's own quantizer, next to the file): Q4_0 is llama.cpp's fastest format on CPUs, so the
comparison is against its best, not only against the type the file was published in.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time


FTYPES = {"Q4_0": 2, "Q8_0": 7}          # llama_ftype values


def requantized(gguf: str, kind: str, threads: int) -> str:
    """Path of `gguf` requantized to `kind`, made once (through a temporary name, then renamed)."""
    import llama_cpp

    stem = gguf[: -len(".gguf")] if gguf.endswith(".gguf") else gguf
    out = f"{stem}.{kind}.gguf"
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, threads
        tmp = f"{out}.{os.getpid()}.tmp"
        if llama_cpp.llama_model_quantize(gguf.encode(), tmp.encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not requantize {gguf} to {kind}")
        os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: a list of prompt strings")
    p.add_argument("--max-new", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--requantize", choices=sorted(FTYPES), help="answer with the file requantized to this type")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from llama_cpp import Llama, __version__

    if args.requantize:
        args.gguf = requantized(args.gguf, args.requantize, args.threads)

    with open(args.prompts) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, flash_attn=False, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    answers = []
    t0 = time.perf_counter()
    for prompt in prompts:
        out = llm(prompt, max_tokens=args.max_new, temperature=0.0, top_k=1, stop=["\n"])
        answers.append(out["choices"][0]["text"])
    seconds = time.perf_counter() - t0
    with open(args.json, "w") as f:
        json.dump({"answers": answers, "seconds": seconds, "load_s": load_s, "version": __version__,
                   "gguf": os.path.basename(args.gguf),
                   "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
