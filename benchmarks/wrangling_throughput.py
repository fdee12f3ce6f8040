"""Rows/s for entity matching with k demonstrations: transformers vs the engine, feature by feature.

Systems, on the same prompts in one run (SmolLM2-135M, float32 compute):
  (a) transformers `generate`, one row at a time
  (b) transformers `generate`, left-padded batches
  (c) the engine without the workload features (no prefix reuse, no bucketing, no early exit)
  (d) the engine adding, in turn: length bucketing, shared-prefix KV reuse, per-sequence early exit;
      and choice scoring (Yes/No from one pass) as a separate row, with its effect on quality.
The greedy answers of (c) and every (d) row are compared and must be identical.

    .venv/bin/python benchmarks/wrangling_throughput.py [--datasets Beer Fodors-Zagats] [--k 5] [--limit N]
                                                        [--quick] [--write-doc]

With --vs-llamacpp it instead compares the engine with llama.cpp on an embedded GGUF model (default
the 1.5B) at k = 3: see benchmarks/wrangling_vs_llamacpp.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._doc import engine_commit, load_now, write_section  # noqa: E402

MAX_NEW = 3


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def hf_rows(model, tok, prompts: list[str], batch: int) -> tuple[list[str], float, int]:
    """transformers greedy generate with a newline stop; (answers, seconds, prompt positions computed)."""
    tok.padding_side = "left"
    out: list[str] = []
    positions = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True)
        positions += enc["input_ids"].numel()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, stop_strings=["\n"],
                                 tokenizer=tok, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += [first_line(tok.decode(row, skip_special_tokens=True)) for row in new]
    return out, time.perf_counter() - t0, positions


def engine_rows(llm, prompts, *, bucket: bool, share_prefix: bool, early_exit: bool) -> tuple[list[str], float, int]:
    t0 = time.perf_counter()
    kw = dict(stop="\n") if early_exit else dict(ignore_eos=True)
    texts = llm.generate_text(prompts, max_new_tokens=MAX_NEW, bucket=bucket, share_prefix=share_prefix, **kw)
    return [first_line(t) for t in texts], time.perf_counter() - t0, llm.last_stats["prefill_positions"]


def choice_rows(llm, prompts) -> tuple[list[str], float, int]:
    t0 = time.perf_counter()
    scores = llm.score_choices(prompts, [" Yes", " No"])
    return ([" Yes" if s[0] >= s[1] else " No" for s in scores], time.perf_counter() - t0,
            llm.last_stats["prefill_positions"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["Beer", "Fodors-Zagats"])
    ap.add_argument("--k", type=int, default=None, help="demonstrations (default: 5; 3 with --vs-llamacpp)")
    ap.add_argument("--limit", type=int, default=None, help="first N test pairs (default: all)")
    ap.add_argument("--hf-single-limit", type=int, default=48,
                    help="rows for (a), the slowest system; its rows/s is measured on this many")
    ap.add_argument("--batch", type=int, default=16, help="batch of (b) and gpu_batch_size of the engine")
    ap.add_argument("--quick", action="store_true", help="30 rows per dataset; prints, writes no doc")
    ap.add_argument("--write-doc", action="store_true", help="write docs/benchmarks.md also with --quick or --limit")
    peer = ap.add_argument_group("--vs-llamacpp: the engine against llama.cpp on the same GGUF")
    peer.add_argument("--vs-llamacpp", action="store_true")
    peer.add_argument("--model", default="qwen2.5-coder-1.5b", help="embedded model (default: %(default)s)")
    peer.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    peer.add_argument("--llama-python", help="a python that imports llama_cpp (default: $LLAMA_CPP_PYTHON)")
    peer.add_argument("--policy", default="{}", help="engine Policy fields as JSON (default: Policy())")
    peer.add_argument("--work", default="/tmp/flexwrangle-bench/vs-llamacpp")
    peer.add_argument("--quantized", action="store_true",
                      help="the engine's stored precisions instead: fp16 and 4-bit weights + 4-bit cache, each "
                           "computed in float32 and with int8 products (llama.cpp Q4_0 as the reference)")
    args = ap.parse_args(argv)
    if args.vs_llamacpp:
        from benchmarks import wrangling_vs_llamacpp
        args.k = 3 if args.k is None else args.k
        return wrangling_vs_llamacpp.main(args)
    args.k = 5 if args.k is None else args.k
    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    if args.quick:
        args.limit, args.hf_single_limit = 30, 8

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import LLM, Policy
    from engine.registry import resolve_model
    from wrangling_tasks import get_task, load_benchmark, prepare

    path = resolve_model("smollm2-135m")
    llm = LLM.from_pretrained("smollm2-135m", dtype="float32", progress=False,
                              policy=Policy(gpu_batch_size=args.batch))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    parse = get_task("entity-matching").parse
    score = get_task("entity-matching").score

    sections = []
    for name in args.datasets:
        inputs = load_benchmark("entity-matching", name, "test")
        prep = prepare("entity-matching", inputs, llm, k=args.k, limit=args.limit)
        prompts, labels = list(prep.items["prompt"]), list(prep.items["label"])
        n = len(prompts)
        ntok = [len(llm.encode(p)) for p in prompts]
        rows = []

        def add(system, answers, seconds, positions, n_rows=n, compare=None):
            f1 = score([parse(a) for a in answers], labels[: n_rows])["f1"] if n_rows == n else float("nan")
            same = "—" if compare is None else ("yes" if answers == compare else
                                                f"no ({sum(a != b for a, b in zip(answers, compare))} differ)")
            rows.append((system, n_rows, seconds, n_rows / seconds, positions / n_rows, positions / seconds, f1, same))
            print(f"{name}: {system}: {n_rows / seconds:.2f} rows/s, {positions / n_rows:.0f} prompt positions "
                  f"a row, F1 {f1:.3f}, identical to (c): {same}", flush=True)

        single = prompts[: args.hf_single_limit]
        add("(a) transformers, one row at a time", *hf_rows(hf, tok, single, 1), n_rows=len(single))
        add(f"(b) transformers, batch {args.batch}", *hf_rows(hf, tok, prompts, args.batch))
        base, c_s, c_pos = engine_rows(llm, prompts, bucket=False, share_prefix=False, early_exit=False)
        add("(c) engine, no workload features", base, c_s, c_pos, compare=base)
        add("(d1) + length bucketing",
            *engine_rows(llm, prompts, bucket=True, share_prefix=False, early_exit=False), compare=base)
        add("(d2) + shared-prefix KV reuse",
            *engine_rows(llm, prompts, bucket=True, share_prefix=True, early_exit=False), compare=base)
        prefix_len = llm.last_stats.get("prefix_len", 0)
        add("(d3) + per-sequence early exit (newline stop)",
            *engine_rows(llm, prompts, bucket=True, share_prefix=True, early_exit=True), compare=base)
        add("(d4) choice scoring (Yes/No log-probs, one pass)", *choice_rows(llm, prompts), compare=base)

        lines = [f"#### {name} (test, {n} pairs, k = {args.k}; prompts {min(ntok)}–{max(ntok)} tokens, "
                 f"shared prefix {prefix_len} tokens)", "",
                 "| system | rows | seconds | rows/s | prompt positions a row | positions/s | F1 | "
                 "answers identical to (c) |",
                 "|---|---:|---:|---:|---:|---:|---:|---|"]
        for system, n_rows, seconds, rps, per_row, pps, f1, same in rows:
            lines.append(f"| {system} | {n_rows} | {seconds:.1f} | {rps:.2f} | {per_row:.0f} | {pps:.0f} | "
                         f"{'—' if f1 != f1 else f'{100 * f1:.1f}'} | {same} |")
        by = {r[0][:4]: r for r in rows}
        rate = {k: r[3] for k, r in by.items()}
        d3, a = by["(d3)"], by["(a) "]
        lines += ["", f"Ratios of (d3), all generation features on: {d3[3] / rate['(c) ']:.1f}× (c), "
                  f"{d3[3] / rate['(a) ']:.1f}× (a), {d3[3] / rate['(b) ']:.1f}× (b). "
                  f"Prefix reuse + bucketing alone, (d2) / (c): {rate['(d2)'] / rate['(c) ']:.1f}×.", "",
                  f"What bounds the ratio over (a): every system here computes prompt positions at a similar "
                  f"rate (all are compute-bound in float32 on 2 cores), so rows/s follows the positions a row "
                  f"costs. (a) computes {a[4]:.0f} a row at {a[5]:.0f} positions/s; (d3) computes {d3[4]:.0f} "
                  f"(its own tokens, the block's padding and a share of the prefix computed once) at "
                  f"{d3[5]:.0f}/s, where each of its positions also attends over the {prefix_len}-token prefix. "
                  f"At equal rates the ratio would be {a[4] / d3[4]:.1f}×.", ""]
        sections.append("\n".join(lines))

    md = "\n".join([
        "### Wrangling throughput: entity matching with few-shot prompts (issue 9)", "",
        f"SmolLM2-135M-Instruct, float32 compute, greedy, at most {MAX_NEW} new tokens. (a) is measured on the "
        f"first {args.hf_single_limit} pairs (its rows/s is the figure compared). Run {started}, engine at "
        f"commit {commit}; load average at the end: {load_now()}. "
        "Command: `.venv/bin/python benchmarks/wrangling_throughput.py"
        f"{' --limit ' + str(args.limit) if args.limit else ''}`.", "",
        *sections,
        "Targets: ≥ 3× rows/s from prefix reuse plus bucketing over (c); ≥ 10× over (a); ≥ 3× over (b).", ""])
    if args.write_doc or not (args.quick or args.limit):
        write_section("wrangling_throughput", md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
