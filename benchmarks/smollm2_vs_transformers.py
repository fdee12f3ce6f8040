"""SmolLM2-135M in RAM: the engine against transformers `generate`, same prompts, same run (issue 5).

    python benchmarks/smollm2_vs_transformers.py            # batch 16, prompt 256, 16 new, 3 rounds (~5 min)
    python benchmarks/smollm2_vs_transformers.py --quick    # batch 4, prompt 64, 8 new, 1 round (~1 min)

Both load the engine's converted checkpoint of the embedded GGUF (models/...gguf.flexwrangle, fp32
safetensors; `make model` fetches the GGUF). Prompts are real text: windows of the tokenized
benchmarks/data/plain_english.txt at different offsets (no common prefix, so the engine's
shared-prefix reuse does not apply). Every run is a fresh subprocess; the systems alternate
(A B, B A, A B, ...) so that load changes hit both; the table gives every round and the medians.
transformers computes in fp32; the engine with its defaults (fp16 storage, fp32 compute, all on
the compute tier, one micro-batch). Writes the section `smollm2_vs_transformers` of
docs/benchmarks.md (full mode; --quick prints unless --write-doc).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import PY, REPO, gib, run_json  # noqa: E402

SECTION = "smollm2_vs_transformers"
TEXT = REPO / "benchmarks" / "data" / "plain_english.txt"


def model_dir() -> Path:
    from engine.registry import resolve_model
    return Path(resolve_model("smollm2-135m"))


def make_prompts(tok, batch: int, prompt_len: int) -> list[list[int]]:
    ids = tok(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < prompt_len + batch:
        raise SystemExit(f"{TEXT}: {len(ids)} tokens, too short for {batch} windows of {prompt_len}")
    stride = max(1, (len(ids) - prompt_len) // batch)
    return [ids[i * stride: i * stride + prompt_len] for i in range(batch)]


def run_system(system: str, mdir: Path, ids_file: Path, shape, work: Path, rnd: int, omp: str) -> dict:
    batch, prompt_len, gen_len = shape
    _harness.omp_passive(omp == "passive")
    out = work / f"{system}-{omp}-r{rnd}.json"
    if system == "transformers":
        cmd = [PY, "benchmarks/_hf_generate.py", "--model", str(mdir), "--batch", str(batch),
               "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--ids", str(ids_file),
               "--save-tokens", "--json", str(out)]
    else:
        cmd = [PY, "benchmarks/_engine_generate.py", "--model", "smollm2-135m", "--ids", str(ids_file),
               "--gen-len", str(gen_len), "--json", str(out)]
    r = run_json(cmd, out, log=work / f"{system}-{omp}-r{rnd}.log")
    if "result" not in r:
        raise SystemExit(f"{system} failed: {r.get('error')} (log {r['log']})")
    r["result"]["peak_rss_bytes"] = r["peak_rss_bytes"]
    res = r["result"]
    print(f"  round {rnd} {system} (OpenMP {omp}): {res['total_tokens_per_s']:.2f} tok/s, prefill {res['prefill_s']:.2f} s, "
          f"decode {res['decode_s']:.2f} s, peak RSS {gib(r['peak_rss_bytes'])} GiB, load {_doc.load_now()}",
          flush=True)
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical sequences, mean share of positions before the first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n / max(1, len(x)))
    return same, sum(prefix) / len(prefix)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--work", default="/tmp/flexwrangle-bench/smollm2")
    p.add_argument("--omp", choices=("default", "passive", "both"), default="both",
                   help="OpenMP wait policy of the measured processes: defaults, OMP_WAIT_POLICY=PASSIVE, or "
                        "both (each with its own rounds)")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args(argv)
    shape = (4, 64, 8) if args.quick else (16, 256, 16)
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, t0, load0, commit = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter(), _doc.load_now(), \
        _doc.engine_commit()
    mdir = model_dir()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(mdir), local_files_only=True)
    prompts = make_prompts(tok, shape[0], shape[1])
    ids_file = work / "prompts.json"
    ids_file.write_text(json.dumps(prompts))
    omps = ("default", "passive") if args.omp == "both" else (args.omp,)
    results = {(o, s): [] for o in omps for s in ("transformers", "engine")}
    for omp in omps:
        for rnd in range(rounds):
            order = ("transformers", "engine") if rnd % 2 == 0 else ("engine", "transformers")
            for system in order:
                results[(omp, system)].append(run_system(system, mdir, ids_file, shape, work, rnd, omp))
    rows, summary = [], []
    for omp in omps:
        for rnd in range(rounds):
            for s in ("transformers", "engine"):
                r = results[(omp, s)][rnd]
                rows.append([omp, rnd + 1, s, f"{r['total_tokens_per_s']:.2f}", f"{r['prefill_s']:.2f}",
                             f"{r['prefill_tokens_per_s']:.0f}", f"{1000 * r['decode_s'] / (shape[2] - 1):.0f}",
                             gib(r["peak_rss_bytes"])])
        med = {s: statistics.median(r["total_tokens_per_s"] for r in results[(omp, s)])
               for s in ("transformers", "engine")}
        ratios = [e["total_tokens_per_s"] / h["total_tokens_per_s"]
                  for e, h in zip(results[(omp, "engine")], results[(omp, "transformers")])]
        ratio_med = statistics.median(ratios)
        summary.append(
            f"- OpenMP {omp}: median engine {med['engine']:.2f} tok/s, transformers {med['transformers']:.2f} "
            f"tok/s; engine / transformers per round {', '.join(f'{x:.2f}x' for x in ratios)}, median "
            f"**{ratio_med:.2f}x** (target >= 1.0x: **{'met' if ratio_med >= 1.0 else 'missed'}**).")
    first = omps[0]
    same, prefix = agreement(results[(first, "engine")][0]["tokens"], results[(first, "transformers")][0]["tokens"])
    b, pl, g = shape
    md = "\n".join([
        "## SmolLM2-135M in RAM: engine vs transformers (`benchmarks/smollm2_vs_transformers.py`)",
        "",
        f"Run {started}, {(time.perf_counter() - t0) / 60:.1f} min, engine at commit {commit}. Load average at "
        f"start {load0}, at end {_doc.load_now()} (2 shared cores).",
        "",
        f"Command: `python benchmarks/smollm2_vs_transformers.py{' ' + ' '.join(argv) if argv else ''}`",
        "",
        f"Workload: batch {b}, prompt {pl} tokens (windows of benchmarks/data/plain_english.txt at different "
        f"offsets), {g} new tokens, greedy, every sequence runs all {g} steps. Both read the converted "
        "SmolLM2-135M-Instruct checkpoint (fp32 safetensors from the Q4_1 GGUF); transformers computes in "
        "fp32, the engine with its defaults (weights and KV cache on the compute tier, fp16 storage rounded, "
        "fp32 compute, one micro-batch). Each run is a fresh process; systems alternate between rounds. "
        "tok/s = generated tokens / generate() wall time. `OpenMP passive` = OMP_WAIT_POLICY=PASSIVE for "
        "both systems (idle OpenMP threads sleep instead of spinning, which on this loaded 2-core machine "
        "otherwise costs about a millisecond per small op).",
        "",
        _doc.md_table(["OpenMP", "round", "system", "tok/s", "prefill s", "prefill tok/s", "decode ms/step",
                       "peak RSS GiB"], rows),
        "",
        *summary,
        f"- Greedy tokens, engine vs transformers (first round): {100 * same:.0f}% of sequences identical, "
        f"{100 * prefix:.0f}% of positions before the first difference (the engine rounds weights and "
        "cache through fp16 by default, transformers keeps fp32).",
    ])
    print(md)
    if not args.quick or args.write_doc:
        _doc.write_section(SECTION, md)
        print(f"wrote {_doc.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
