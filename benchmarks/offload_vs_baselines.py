"""Offloading against the baselines in one run: transformers in RAM, Accelerate disk offload, the engine.

    python benchmarks/offload_vs_baselines.py            # full: random OPT-1.3b, about 1.5-2 h
    python benchmarks/offload_vs_baselines.py --quick    # random OPT-125m, one tiny shape, 2-3 min
    python benchmarks/offload_vs_baselines.py --resume                     # finish an interrupted run
    python benchmarks/offload_vs_baselines.py --resume --rerun eng-p32g64  # measure one group again

One random-weight fp16 checkpoint is written with `save_pretrained` (benchmarks/_checkpoint.py) and
every system reads it. Every run is a fresh subprocess whose peak RSS is the kernel's high-water
mark for that process (os.wait4), split by /proc polling into anonymous and file-backed pages.

Rows:
  1. Equal memory: the same cap on peak RSS for Accelerate disk offload (`device_map="auto"`,
     `max_memory`, `offload_folder`) and the engine (weights 100% on disk, KV cache in CPU RAM),
     on FlexGen's shape and two decode-heavy shapes (gen 64, and gen 256, where the
     engine keeps its weights 4-bit, on disk or in CPU RAM). Each system climbs its list of
     batch sizes and stops at the first run that passes the cap (the run is killed there); its
     best feasible row is the fastest one under the cap.
  2. Everything in memory: the engine (weights and cache on the compute tier) against
     transformers `generate` at the same batch.
  3. Disk-bound: the engine with overlap on and off (small batch, decode only matters), with fp16
     weights (the disk takes ~10x the compute: little to hide) and with 4-bit weights (the two
     are about even: the case overlap exists for), at gen 16 and, with 4-bit weights, at gen 64
     (prefill is compute-bound and the same either way, so a longer run shows the decode's gain).

For every row, the roofline floor T_min = max(FLOPs / fp32 matmul rate, disk bytes / O_DIRECT
read bandwidth), with both rates probed right before and after that row (the machine is shared,
so rates move); FLOPs come from the model shape (2 * matmul params per token, causal attention,
the LM head at each generated position). Writes the section `offload_vs_baselines` of
docs/benchmarks.md (full mode; --quick only prints unless --write-doc) and the plot
docs/offload_throughput.png (one file: each run that writes the doc replaces it).

The modes are data in benchmarks/_offload_modes.py, the rows and their commands come from
benchmarks/_offload_plan.py, the section and the plot from benchmarks/_offload_report.py.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402
from benchmarks._harness import PY, gib, omp_passive, probe, run_json  # noqa: E402
from benchmarks._offload_modes import MODES  # noqa: E402
from benchmarks._offload_plan import Row, plan  # noqa: E402
from benchmarks._offload_report import PLOT, has_plot, model_shape, plot, render  # noqa: E402

SECTION = "offload_vs_baselines"


# ---- running ----------------------------------------------------------------------------------------
def run_row(row: Row, work: Path, ckpt: Path, cap: int | None, quick: bool) -> Row:
    probe_file = ckpt / "model.safetensors"
    row.probes.append(probe(probe_file, quick))
    log = work / "logs" / f"{row.label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {row.label}: {shlex.join(row.cmd[1:])}", flush=True)
    started, commit = time.strftime("%Y-%m-%d %H:%M"), _doc.engine_commit()
    row.run = run_json(row.cmd, row.json_path, log=log, rss_cap=cap)
    row.run.update(started=started, engine_commit=commit, load_after=_doc.load_now())
    row.probes.append(probe(probe_file, quick))
    r = row.run
    status = (f"{row.result['total_tokens_per_s']:.2f} tok/s" if row.ok else r.get("error", "failed"))
    print(f"    -> {status}; peak RSS {gib(r['peak_rss_bytes'])} GiB (anon {gib(r['peak_anon_bytes'])}, "
          f"file {gib(r['peak_file_bytes'])}); wall {r['wall_s']:.0f} s; load {_doc.load_now()}", flush=True)
    for d in (work / "accelerate_offload", work / "engine_offload"):
        shutil.rmtree(d, ignore_errors=True)
    return row


def climb(rows: list[Row], work, ckpt, cap, quick) -> list[Row]:
    """Run rows in order of batch; stop after the first one that does not fit the cap.

    Rows that already hold a run (from --resume) are kept, not rerun."""
    done = []
    for row in rows:
        done.append(row if row.run else run_row(row, work, ckpt, cap, quick))
        if not row.feasible(cap):
            break
    return done


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="OPT-125m, one tiny shape (2-3 minutes)")
    p.add_argument("--work", default="/tmp/flexwrangle-bench", help="checkpoints, offload files, logs")
    p.add_argument("--only", nargs="*", help="run only these groups (e.g. acc-p32g64 eng-p32g64 overlap)")
    p.add_argument("--write-doc", action="store_true", help="write docs/ also in --quick mode")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows a previous run of this mode measured (rows.json) and run the rest")
    p.add_argument("--rerun", nargs="*", default=[], help="with --resume: groups to measure again")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for every system (own work folder and doc section)")
    p.add_argument("--tag", help="name a measurement set (own work folder and doc section), so that a partial "
                                "run (--only) adds a section instead of replacing the main one; the plot is "
                                "docs/offload_throughput.png for every set")
    p.add_argument("--render-only", action="store_true",
                   help="render (and with --write-doc write) what rows.json holds; run nothing")
    args = p.parse_args(argv)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    omp = omp_passive(args.omp_passive)
    suffix = ("_omp_passive" if args.omp_passive else "") + (f"_set-{args.tag}" if args.tag else "")
    work = Path(args.work) / (mode_name + suffix.replace("_", "-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "json").mkdir(exist_ok=True)
    started, t0, load0 = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter(), _doc.load_now()
    ckpt = Path(args.work) / f"{mode.model}-fp16"
    print(f"checkpoint {ckpt} ...", flush=True)
    from benchmarks._harness import run_measured
    r = run_measured([PY, "benchmarks/_checkpoint.py", "--model", mode.model, "--out", str(ckpt)])
    if r["rc"] != 0:
        raise SystemExit(f"writing the checkpoint failed: {r}")
    m = model_shape(ckpt)
    m["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    cap = int(mode.cap_gib * 2 ** 30)
    rows: list[Row] = []
    groups = plan(mode, ckpt, work)
    if args.render_only:
        args.resume, args.only = True, ["-"]
    if args.resume and (work / "rows.json").exists():
        for d in json.loads((work / "rows.json").read_text()):
            row = next((x for x in groups.get(d["key"], []) if x.label == d["label"]), None)
            if row is not None and d["key"] not in args.rerun:
                row.run, row.probes = d["run"], d["probes"]
    for name, group in groups.items():
        if args.only and name not in args.only:
            rows += [x for x in group if x.run]          # keep what --resume loaded
            continue
        if name.startswith(("acc-", "eng-")):
            rows += climb(group, work, ckpt, cap, args.quick)
        else:
            rows += [x if x.run else run_row(x, work, ckpt, None, args.quick) for x in group]
        (work / "rows.json").write_text(json.dumps(     # every measured row, resumed ones included
            [dict(key=x.key, label=x.label, group=x.group, system=x.system, shape=x.shape, batch=x.batch, run=x.run,
                  probes=x.probes) for g in groups.values() for x in g if x.run], indent=1, default=str))
    md = render(mode_name, mode, rows, m, cap, started, None if args.render_only else (load0, _doc.load_now()), argv,
                time.perf_counter() - t0, omp, suffix, args.tag)
    print(md)
    write = args.write_doc or not (args.quick or args.render_only)
    plotted = has_plot(rows)
    if plotted:
        plot(rows, mode, cap, PLOT if write else work / PLOT.name)
    if write:
        _doc.write_section(SECTION + suffix, md)
        print(f"wrote {_doc.DOC}" + (f" and {PLOT}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
