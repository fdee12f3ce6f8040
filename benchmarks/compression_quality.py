"""4-bit group-wise compression on SmolLM2-135M: quality, bytes and disk throughput (issue 4).

    python benchmarks/compression_quality.py            # 10 configs x full text + throughput runs (~20-30 min)
    python benchmarks/compression_quality.py --quick    # group size 64 only, 4 windows, one small throughput pair (~2 min)

Quality, for none / weights / cache / both at group sizes 32, 64, 128 (weights grouped along the
output dimension, cache along the head dimension, asymmetric min-max, as the engine does):
  - perplexity over benchmarks/data/plain_english.txt: windows of CONTEXT + SCORED tokens; the
    context is computed once as a shared prefix whose KV cache is stored in the policy's format
    (so a compressed cache is read back dequantized), then `llm.score_choices` sums the log-probs of
    the SCORED tokens attending to it. (Scoring a whole window in one prefill pass would never read
    the cache back, hiding cache compression.)
  - greedy agreement with the uncompressed engine: one prompt per paragraph of the text (its first
    PROMPT tokens), GEN greedy tokens; identical sequences and positions before the first difference.
The uncompressed baseline is the engine's default fp16 storage; the table also shows fp32 storage.
Bytes: weight bytes the engine holds with weights on the CPU tier, fp16 vs 4-bit, and the model's
fp16 size. Throughput: `python -m engine.bench` with weights 100% on disk, with and without
--compress-weight, same policy, each in a fresh process (SmolLM2, and random OPT-1.3b in full mode).
Writes the section `compression_quality` of docs/benchmarks.md (full mode; --quick prints unless
--write-doc).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402
from benchmarks._harness import PY, REPO, gib, omp_passive, run_json  # noqa: E402

SECTION = "compression_quality"
TEXT = REPO / "benchmarks" / "data" / "plain_english.txt"
MODEL = "smollm2-135m"
CONTEXT, SCORED = 192, 64          # tokens per perplexity window: context (cached) + scored
PROMPT, GEN = 48, 32               # greedy agreement: prompt tokens per paragraph, new tokens


def configs(groups) -> list[tuple[str, int | None, bool, bool, int]]:
    """(name, group size, compress weights, compress cache, weight group dim)."""
    out = [("none", None, False, False, 0)]
    for g in groups:
        out += [("weights", g, True, False, 0), ("cache", g, False, True, 0), ("both", g, True, True, 0)]
    # diagnostic: weights grouped along the input dimension (llama.cpp's Q4 blocks run that way)
    out += [("weights, input dim", g, True, False, 1) for g in groups]
    return out


def policy(g: int | None, cw: bool, cc: bool, batch: int, wdim: int = 0):
    from engine import CompressionConfig, Policy
    g = g or 64
    return Policy(gpu_batch_size=batch, num_gpu_batches=1, compress_weight=cw, compress_cache=cc,
                  comp_weight_config=CompressionConfig(4, g, wdim), comp_cache_config=CompressionConfig(4, g, -1))


def windows(ids: list[int], n_max: int | None) -> list[tuple[list[int], list[int]]]:
    """(context, scored) pairs, scored spans back to back over the text."""
    out, start = [], 0
    while start + CONTEXT + SCORED <= len(ids):
        out.append((ids[start: start + CONTEXT], ids[start + CONTEXT: start + CONTEXT + SCORED]))
        start += SCORED
    return out[:n_max] if n_max else out


def perplexity(llm, wins) -> float:
    """exp(-mean log-prob) of the scored tokens; each context is a shared, cached prefix."""
    total, count = 0.0, 0
    for ctx, scored in wins:
        # two identical continuations make the context a shared prefix (computed once, cached in the
        # policy's format, read back for the scored tokens)
        s = llm.score_choices([ctx], [scored, scored])[0]
        total += (s[0] + s[1]) / 2
        count += len(scored)
    return math.exp(-total / count)


def paragraph_prompts(tok) -> list[list[int]]:
    paras = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    return [tok(p, add_special_tokens=False)["input_ids"][:PROMPT] for p in paras]


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    same = sum(a == b for a, b in zip(ref, got)) / len(ref)
    pre = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a) for a, b in zip(ref, got)]
    return same, sum(pre) / len(pre)


def quality(groups, n_windows) -> tuple[list[dict], dict]:
    import torch
    from engine import LLM
    torch.manual_seed(0)
    rows, ref_tokens = [], None
    meta = {}
    for dtype in ("float32",):                         # reference row: no fp16 rounding at all
        llm = LLM.from_pretrained(MODEL, policy=policy(None, False, False, 16), dtype=dtype, progress=False)
        tok = llm.tokenizer
        ids = tok(TEXT.read_text(), add_special_tokens=False)["input_ids"]
        wins = windows(ids, n_windows)
        prompts = paragraph_prompts(tok)
        t = time.perf_counter()
        ppl = perplexity(llm, wins)
        toks = llm.generate(prompts, max_new_tokens=GEN, ignore_eos=True)
        rows.append(dict(name="none (fp32 storage)", group=None, ppl=ppl, tokens=toks,
                         seconds=time.perf_counter() - t))
        llm.close()
        meta.update(text_tokens=len(ids), windows=len(wins), prompts=len(prompts))
    for name, g, cw, cc, wdim in configs(groups):
        llm = LLM.from_pretrained(MODEL, policy=policy(g, cw, cc, 16, wdim), progress=False)
        t = time.perf_counter()
        ppl = perplexity(llm, wins)
        toks = llm.generate(prompts, max_new_tokens=GEN, ignore_eos=True)
        rows.append(dict(name=name, group=g, ppl=ppl, tokens=toks, seconds=time.perf_counter() - t))
        llm.close()
        print(f"  {name:8s} g={g}: perplexity {ppl:.3f} ({rows[-1]['seconds']:.0f} s), load {_doc.load_now()}",
              flush=True)
    ref_tokens = next(r["tokens"] for r in rows if r["name"] == "none")
    for r in rows:
        r["same"], r["prefix"] = agreement(ref_tokens, r["tokens"])
    return rows, meta


def weight_bytes(g: int) -> dict:
    """Bytes held with weights 100% on the CPU tier (storage format), fp16 vs 4-bit at group size g."""
    from engine import LLM
    out = {}
    for cw in (False, True):
        pol = policy(g, cw, False, 1).replace(w_gpu_percent=0, w_cpu_percent=100)
        llm = LLM.from_pretrained(MODEL, policy=pol, progress=False)
        out["compressed" if cw else "fp16"] = llm.weight_bytes()["cpu"]
        out["model_fp16"] = llm.config.num_params() * 2
        llm.close()
    return out


def throughput(model: str, dummy: bool, shape, block: int, work: Path, g: int, rounds: int = 1) -> list[dict]:
    """fp16 and 4-bit weights on disk, alternating for `rounds` rounds: the disk's speed here drifts
    by 20-40% between runs a minute apart, so a single pair can flip a ratio's verdict."""
    rows = []
    for i, cw in ((i, cw) for i in range(rounds) for cw in (False, True)):
        out = work / f"tp-{model}-b{block}-{int(cw)}-{i}.json"
        cmd = [PY, "-m", "engine.bench", "--model", model, "--percent", "0", "0", "100", "0", "100", "0",
               "--gpu-batch-size", str(block), "--num-gpu-batches", "1", "--prompt-len", str(shape[0]),
               "--gen-len", str(shape[1]), "--offload-dir", str(work / "offload"), "--group-size", str(g),
               "--no-progress", "--json", str(out)] + (["--dummy"] if dummy else []) + \
              (["--compress-weight"] if cw else [])
        print(f"  [{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}", flush=True)
        r = run_json(cmd, out, log=work / f"tp-{model}-b{block}-{int(cw)}-{i}.log")
        if "result" not in r:
            raise SystemExit(f"engine.bench failed: {r.get('error')} (log {r['log']})")
        res = r["result"]
        rows.append(dict(model=model, compressed=cw, cmd="python " + " ".join(cmd[1:]).replace(str(work), "$WORK"),
                         tps=res["total_tokens_per_s"], prefill_s=res["prefill_s"], decode_s=res["decode_s"],
                         disk=res["held_weight_bytes"]["disk"], rss=r["peak_rss_bytes"], shape=shape,
                         block=block, round=i + 1, load=_doc.load_now()))
        print(f"    -> {res['total_tokens_per_s']:.2f} tok/s, disk weights {gib(res['held_weight_bytes']['disk'])} GiB, "
              f"load {_doc.load_now()}", flush=True)
    return rows


def render(rows, meta, wb, tps, args_list, started, load0, wall, commit, groups, omp="") -> str:
    base = next(r for r in rows if r["name"] == "none")
    table = []
    for r in rows:
        d = 100 * (r["ppl"] / base["ppl"] - 1)
        table.append([r["name"], r["group"] or "-", f"{r['ppl']:.3f}", f"{d:+.2f}%", f"{100 * r['same']:.0f}%",
                      f"{100 * r['prefix']:.0f}%"])
    verdict = []
    for kind, limit in (("weights", 10.0), ("cache", 3.0), ("weights, input dim", 10.0)):
        ok = [r["group"] for r in rows if r["name"] == kind and 100 * (r["ppl"] / base["ppl"] - 1) <= limit]
        verdict.append(f"4-bit {kind}: perplexity increase <= {limit:g}% at group sizes "
                       f"{', '.join(map(str, ok)) if ok else 'none of ' + ', '.join(map(str, groups))}")
    lines = [
        "## 4-bit compression: quality, bytes, disk throughput (`benchmarks/compression_quality.py`)",
        "",
        f"Run {started}, {wall / 60:.1f} min, engine at commit {commit}. Load average at start {load0}, "
        f"at end {_doc.load_now()} (2 shared cores). Perplexity and agreement: from "
        f"{meta.get('quality_run', 'this run')}.",
        "",
        f"Command: `python benchmarks/compression_quality.py{' ' + ' '.join(args_list) if args_list else ''}`",
        "",
        f"Model: SmolLM2-135M-Instruct (the embedded GGUF, dequantized to fp32 by the engine's converter). "
        f"Perplexity over benchmarks/data/plain_english.txt ({meta['text_tokens']} tokens): {meta['windows']} "
        f"windows, each {CONTEXT} context tokens held as a shared-prefix KV cache in the policy's format "
        f"(compressed when the cache is) + {SCORED} scored tokens (`llm.score_choices`), so "
        f"{meta['windows'] * SCORED} scored tokens. Greedy agreement: {meta['prompts']} prompts (first {PROMPT} "
        f"tokens of each paragraph), {GEN} new tokens, against the uncompressed engine (`none`, fp16 storage). "
        "Weights: groups along the output dimension; cache: along the head dimension; 4 bits, asymmetric "
        "min-max, fp16 scale and minimum per group. `weights, input dim`: a diagnostic row with weight groups "
        "along the input dimension instead (`CompressionConfig(4, g, 1)`), the direction of the GGUF's own "
        "Q4_1 blocks (32 values of a row) that this checkpoint was dequantized from.",
        "",
        _doc.md_table(["compressed", "group", "perplexity", "vs none", "identical sequences",
                       "positions before first difference"], table),
        "",
        "- " + "; ".join(verdict) + " (targets: <= 10% weights, <= 3% cache).",
    ]
    for g, b in sorted(wb.items()):
        lines.append(f"- Weight bytes held (weights on the CPU tier), group {g}: fp16 {b['fp16'] / 2**20:.1f} MiB, "
                     f"4-bit {b['compressed'] / 2**20:.1f} MiB: **{b['fp16'] / b['compressed']:.2f}x** smaller "
                     f"(model fp16 size {b['model_fp16'] / 2**20:.1f} MiB: {b['model_fp16'] / b['compressed']:.2f}x; "
                     "target >= 3.5x).")
    if tps:
        lines += ["", "Weights 100% on disk (O_DIRECT), KV cache and activations on the compute tier, "
                  f"compressed vs uncompressed, same policy, fresh process each ({omp}):", ""]
        trows = []
        for r in tps:
            trows.append([r["model"], r.get("round", 1), "4-bit" if r["compressed"] else "fp16", f"{r['shape'][0]}/{r['shape'][1]}",
                          r["block"], f"{r['disk'] / 2**20:.0f}", f"{r['tps']:.2f}", f"{r['prefill_s']:.1f}",
                          f"{r['decode_s'] / max(1, r['shape'][1] - 1):.2f}", gib(r["rss"]), r["load"]])
        lines.append(_doc.md_table(["model", "round", "weights", "prompt/gen", "batch", "disk MiB", "tok/s", "prefill s",
                                    "decode s/step", "peak RSS GiB", "load after"], trows))
        lines.append("")
        for model, block in dict.fromkeys((r["model"], r["block"]) for r in tps):
            runs = [r for r in tps if (r["model"], r["block"]) == (model, block)]
            a, b = ([r for r in runs if r["compressed"] == cw] for cw in (False, True))
            med = lambda rs: statistics.median(r["tps"] for r in rs)
            pairs = [y["tps"] / x["tps"] for x, y in zip(a, b)]
            spread = (f"; round by round {min(pairs):.2f}-{max(pairs):.2f}x" if len(pairs) > 1 else "")
            step = lambda rs: statistics.median(r["decode_s"] for r in rs)
            prefill = statistics.median(r["prefill_s"] / (r["prefill_s"] + r["decode_s"]) for r in b)
            lines.append(f"- {model}, batch {block}: compressed / uncompressed = **{med(b) / med(a):.2f}x** "
                         f"(median tok/s of {len(b)} runs each{spread}; target >= 2x); decode steps alone "
                         f"{step(a) / step(b):.2f}x; the prefill is "
                         f"{100 * prefill:.0f}% of the 4-bit run's time. "
                         f"Commands: `{a[0]['cmd']}` and the same with `--compress-weight`.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", default="/tmp/flexwrangle-bench/compression")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--reuse-quality", action="store_true",
                   help="take perplexity and agreement from the last run's results.json in --work; "
                        "measure the bytes (seconds) and the throughput again")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating fp16 / 4-bit throughput runs per model and batch (default 3)")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for the throughput runs")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args(argv)
    omp = omp_passive(args.omp_passive)
    groups = (64,) if args.quick else (32, 64, 128)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, t0, load0, commit = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter(), _doc.load_now(), \
        _doc.engine_commit()
    if args.reuse_quality:
        last = json.loads((work / "results.json").read_text())
        rows, meta = last["rows"], last["meta"]
        meta.setdefault("quality_run", "an earlier run")
        wb = {g: weight_bytes(g) for g in groups}
    else:
        print("quality ...", flush=True)
        rows, meta = quality(groups, 4 if args.quick else None)
        meta["quality_run"] = f"the run of {started} (engine at commit {commit})"
        wb = {g: weight_bytes(g) for g in groups}
    tps = []
    if not args.skip_throughput:
        print("throughput ...", flush=True)
        if args.quick:
            tps += throughput(MODEL, False, (32, 4), 4, work, 64)
        else:
            tps += throughput(MODEL, False, (128, 32), 8, work, 64, args.rounds)
            tps += throughput("opt-1.3b", True, (32, 16), 16, work, 64, args.rounds)
            tps += throughput("opt-1.3b", True, (32, 16), 2, work, 64, args.rounds)    # disk-bound: little compute per step
    (work / "results.json").write_text(json.dumps(dict(rows=rows, meta=meta, wb=wb, tps=tps), default=str))
    md = render(rows, meta, wb, tps, argv, started, load0, time.perf_counter() - t0, commit, groups, omp)
    print(md)
    if not args.quick or args.write_doc:
        _doc.write_section(SECTION, md)
        print(f"wrote {_doc.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
