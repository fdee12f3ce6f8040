"""What the one-pass C kernels (engine/kernels/int8.c, rotary.c) buy on the wrangling workload.

The same engine, the same prompts, with the kernels and without them (FLEXWRANGLE_KERNELS_OFF, so torch's
passes stand in): entity matching at k = 3 on each dataset's test pairs, a fresh process per run, rounds
alternating the order, medians. The kernels give torch's bits, so the answers must be the same both
ways; the table says whether they were.

    .venv/bin/python benchmarks/fused_kernels.py [--model smollm2-135m] [--datasets Beer Fodors-Zagats]
        [--policies fp32 int8 4bit-int8] [--rounds 5] [--write-doc]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness  # noqa: E402
from benchmarks._doc import engine_commit, load_now, md_table, publish  # noqa: E402
from benchmarks._harness import PY, run_json  # noqa: E402
from benchmarks.wrangling_vs_llamacpp import FOUR_BIT, build_prompts  # noqa: E402

SECTION = "fused_kernels"
KERNELS = "int8_quantize,int8_scale,rotary,int8_rows_from_4bit"
POLICIES = {"fp32": ("float32 compute", {}), "int8": ("int8 products", {"int8_matmul": True}),
            "4bit-int8": ("4-bit weights + cache, int8 products", {**FOUR_BIT, "int8_matmul": True})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--datasets", nargs="+", default=["Beer", "Fodors-Zagats"])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/flexwrangle-bench/fused-kernels")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)
    from engine.registry import resolve_model
    resolve_model(args.model)                        # convert once, outside the timed runs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    sections = []
    for dataset in args.datasets:
        prompts, _, _ = build_prompts(dataset, args.k, None)
        pf = work / f"{dataset}.prompts.json"
        pf.write_text(json.dumps(prompts))
        runs = {(p, on): [] for p in args.policies for on in (True, False)}
        for r in range(args.rounds):
            for policy, on in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                out = work / f"{dataset}.{r}.json"
                _harness.ENV_EXTRA.pop("FLEXWRANGLE_KERNELS_OFF", None)
                if not on:
                    _harness.ENV_EXTRA["FLEXWRANGLE_KERNELS_OFF"] = KERNELS
                res = run_json([PY, "benchmarks/_engine_answer.py", "--model", args.model, "--prompts", str(pf),
                                "--json", str(out), "--policy", json.dumps(POLICIES[policy][1])], out,
                               log=work / f"{dataset}.{r}.log")
                _harness.ENV_EXTRA.pop("FLEXWRANGLE_KERNELS_OFF", None)
                if "result" not in res:
                    raise SystemExit(f"{policy} on {dataset} failed: {res.get('error')}")
                runs[policy, on].append((len(prompts) / res["result"]["seconds"], res["result"]["answers"]))
                print(f"{dataset} round {r + 1}: {POLICIES[policy][0]}, kernels {'on' if on else 'off'}: "
                      f"{runs[policy, on][-1][0]:.2f} rows/s", flush=True)
        rows = []
        for policy in args.policies:
            on, off = runs[policy, True], runs[policy, False]
            m_on, m_off = (statistics.median(x for x, _ in rs) for rs in (on, off))
            same = all(a == on[0][1] for _, a in on + off)
            rows.append([POLICIES[policy][0], f"{m_off:.2f}", f"{m_on:.2f}", f"**{m_on / m_off:.2f}×**",
                         ", ".join(f"{x:.2f}" for x, _ in off), ", ".join(f"{x:.2f}" for x, _ in on),
                         "yes" if same else "**no**"])
        sections += [f"#### {dataset} (test, {len(prompts)} pairs)", "",
                     md_table(["policy", "without (rows/s)", "with (rows/s)", "with / without", "rounds without",
                               "rounds with", "same answers"], rows), ""]
    md = "\n".join([
        f"### One-pass kernels for int8 products and rotary embeddings, on entity matching with `{args.model}`",
        "", "engine/kernels/int8.c quantizes each row of a product's input to int8 and scales the int32 sums back "
        "to float in one pass each, and makes 4-bit weights int8 rows without a float32 copy in between; "
        "engine/kernels/rotary.c applies rotary embeddings in one pass. `without` runs "
        f"the same engine with FLEXWRANGLE_KERNELS_OFF={KERNELS} (torch's passes). The project's k = {args.k} "
        "prompts, greedy, newline stop, at most 3 new tokens, weights and cache stored in float16 unless 4-bit; "
        "model load excluded; a fresh process per run, rounds alternating the order. "
        f"Run {started}, engine at commit {commit}; load average at the end: {load_now()}. Command: "
        f"`.venv/bin/python benchmarks/fused_kernels.py --model {args.model} --rounds {args.rounds}"
        f"{'' if args.datasets == ['Beer', 'Fodors-Zagats'] else ' --datasets ' + ' '.join(args.datasets)}"
        f"{'' if args.policies == list(POLICIES) else ' --policies ' + ' '.join(args.policies)}`.",
        "", *sections])
    publish(SECTION if args.model == "smollm2-135m" else f"{SECTION}_{args.model}", md, args.write_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
