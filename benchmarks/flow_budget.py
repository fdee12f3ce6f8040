"""The wrangle flow under a memory budget against the same flow with the whole machine: rows/s, answers, peaks.

Entity matching on Beer's 91 test pairs at k = 3 with the default model, through the `wrangle` flow
itself (DuckDB in and out, Great Expectations, the run record), each configuration in a fresh process
per round on a fresh copy of the database; rounds alternate the order. Configurations:

  * in memory: policy "auto", no caps (the search places everything in RAM);
  * small worker: policy "auto" with gpu_mem 2GB and cpu_mem 2GB, the rest on disk (the
    `entity-matching-small-worker` deployment);
  * small worker, int8: the same caps with {"auto": true, "int8_matmul": true}.

Rows/s is the flow's own (rows written / inference seconds; model load excluded). Peaks are the
engine's trackers (per tier) and the process's peak RSS, as the run record stores them.

    .venv/bin/python benchmarks/flow_budget.py [--rounds 3] [--write-doc]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._doc import engine_commit, load_now, publish  # noqa: E402
from benchmarks._harness import PY, gib, run_json  # noqa: E402

SECTION = "flow_budget"
BEER = dict(task="entity-matching", table="beer_test_pairs", left_table="beer_table_a", right_table="beer_table_b",
            demos_table="beer_train_pairs", spec="Beer", k=3)
SMALL = dict(gpu_mem="2GB", cpu_mem="2GB")
CONFIGS = {
    "in memory": dict(policy="auto"),
    "small worker": dict(policy="auto", **SMALL),
    "small worker, int8": dict(policy={"auto": True, "int8_matmul": True}, **SMALL),
}
RUN = """
import json, sys
from flows.wrangle import wrangle
out = wrangle(**json.loads(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    json.dump(out, f, default=str)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--work", default="/tmp/flexwrangle-bench/flow-budget")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # a Prefect of its own, offline (the flows start a temporary server in each process)
    for key, value in (("PREFECT_HOME", str(work / "prefect")), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                       ("DO_NOT_TRACK", "1"), ("GX_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    os.environ.pop("PREFECT_API_URL", None)
    import duckdb

    from flows.load_benchmarks import load_benchmarks

    master = work / "master.duckdb"
    load_benchmarks(datasets=["Beer"], database=str(master))
    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    answers: dict[str, list] = {}
    for r in range(args.rounds):
        for name in (args.configs if r % 2 == 0 else list(reversed(args.configs))):
            slug = name.replace(" ", "-").replace(",", "")
            db, out = work / f"{slug}.{r}.duckdb", work / f"{slug}.{r}.json"
            shutil.copy(master, db)
            params = dict(BEER, database=str(db), **CONFIGS[name])
            res = run_json([PY, "-c", RUN, json.dumps(params), str(out)], out, log=work / f"{slug}.{r}.log")
            if "result" not in res:
                raise SystemExit(f"{name} failed: {res.get('error')} (log {work / f'{slug}.{r}.log'})")
            got = res["result"]
            with duckdb.connect(str(db), read_only=True) as con:
                answers[name] = con.execute("SELECT row_key, raw_output FROM wrangle_entity_matching "
                                            "ORDER BY row_key").fetchall()
            runs[name].append(dict(rows_per_s=got["rows_per_s"], f1=got["metrics"]["f1"], peak=got["peak_bytes"],
                                   rss=res["peak_rss_bytes"], policy=json.loads(got["policy"])))
            print(f"round {r + 1}: {name}: {got['rows_per_s']:.2f} rows/s, F1 {got['metrics']['f1']:.3f}, "
                  f"peaks {got['peak_bytes']}, RSS {gib(res['peak_rss_bytes'])} GiB", flush=True)

    base = statistics.median(x["rows_per_s"] for x in runs[args.configs[0]])
    lines = ["### The wrangle flow under a memory budget (`benchmarks/flow_budget.py`)", "",
             f"Beer test pairs (91) at k = 3, default model, through the `wrangle` flow; {args.rounds} alternating "
             f"rounds, a fresh process and database each. Run {started}, engine at commit {commit}; load average at "
             f"the end: {load_now()}. Command: `.venv/bin/python benchmarks/flow_budget.py`.", "",
             "| configuration | policy chosen | rows/s (median) | rounds | vs first row | F1 | answers as first row | "
             "peak gpu / cpu / disk tier | peak RSS |",
             "|---|---|---:|---|---:|---:|---:|---|---:|"]
    first = answers[args.configs[0]]
    for name, rs in runs.items():
        med = statistics.median(x["rows_per_s"] for x in rs)
        p = rs[0]["policy"]
        chosen = (f"block {p['gpu_batch_size']}×{p['num_gpu_batches']}, weights {p['w_gpu_percent']:g}/"
                  f"{p['w_cpu_percent']:g}% gpu/cpu, cache {p['cache_gpu_percent']:g}/{p['cache_cpu_percent']:g}%"
                  + (", int8" if p.get("int8_matmul") else "") + (", 4-bit weights" if p["compress_weight"] else ""))
        peak = rs[0]["peak"]
        same = sum(a == b for a, b in zip(answers[name], first))
        rounds = ", ".join(f"{x['rows_per_s']:.2f}" for x in rs)
        lines.append(f"| {name} | {chosen} | {med:.2f} | {rounds} | "
                     f"{med / base:.2f}× | {100 * rs[0]['f1']:.1f} | {same}/{len(first)} | "
                     f"{gib(peak['gpu'])} / {gib(peak['cpu'])} / {gib(peak['disk'])} GiB | "
                     f"{gib(max(x['rss'] for x in rs))} GiB |")
    publish(SECTION, "\n".join(lines) + "\n", args.write_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
