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
     on FlexGen's shape and two decode-heavy shapes (gen 64, and the issue's gen 256, where the
     engine keeps its weights 4-bit, and its cache 4-bit or fp16). Each system climbs its list of
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
docs/benchmarks.md (full mode; --quick only prints unless --write-doc) and docs/offload_throughput.png.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _doc  # noqa: E402
from benchmarks._harness import PY, REPO, gib, omp_passive, probe, run_json  # noqa: E402

SECTION = "offload_vs_baselines"
PLOT = REPO / "docs" / "offload_throughput.png"

# --percent of the engine runs: W_GPU W_CPU C_GPU C_CPU A_GPU A_CPU (disk the rest)
W_DISK_CACHE_CPU = (0, 0, 0, 100, 100, 0)
W_CPU_CACHE_CPU = (0, 100, 0, 100, 100, 0)
ALL_IN_MEMORY = (100, 0, 100, 0, 100, 0)


MODES = {
    "full": dict(
        model="opt-1.3b", cap_gib=5.0,
        # climb one step past the engine's list while runs still fit; Accelerate's step past its list
        # (batch 16 at prompt 512) passed the cap in the run of 2026-11-22 01:51, and each of its
        # decode-heavy runs takes 10+ minutes here
        extra_doublings={"engine": 1, "accelerate": 0},
        shapes=[(512, 32), (32, 64), (32, 256)],
        accelerate_max_memory="1GiB",
        # decode-heavy shape: Accelerate's batch 64 fit the cap at 4.74-4.80 GiB on 2026-11-22 and passed it
        # (5.03 GiB) on 2026-11-30, so the climb starts at 32. At gen 256 its fp32 KV cache grows 4.5x
        # longer: batch 16 (1.8 GB of cache), and no climb (a run that passes the cap late costs 15 min)
        # At gen 256 batch 16 peaked at 3.97 GiB with 1.8 GB of its fp32 cache (3.64 tok/s) and 20 at
        # 4.30 GiB (4.15 tok/s), so the climb starts at 20. Batch 24 passed the cap after 1057 s in set
        # kernel-2026-11-30 (5.04 GiB, anon 4.91) and fit it in set attn-2026-12-01 (4.53 GiB, anon
        # 4.39): Accelerate's peak moves by half a GiB between runs of one batch, so it climbs on.
        # On the Xeon (set quiet-2026-12-05) batch 20 passed the cap after 508 s (5.02 GiB, anon
        # 4.81), so the climb starts at 16 again
        accelerate_batches={(512, 32): [4, 8], (32, 64): [32, 64], (32, 256): [16, 20, 24]},
        engine_blocks={(512, 32): [(8, 1), (8, 2)], (32, 64): [(64, 1)]},
        no_climb={(32, 256)},
        # at gen 256, fixed runs instead of a doubling climb: 4-bit weights with the fp16 cache at
        # batch 48 (2.7 GB of cache; 48 rows take 0.40 ms a row of 16M weights, 64 rows 0.43) on disk,
        # then held in RAM: 0.74 GiB of 4-bit weights fit beside the cache, and each read from disk
        # steals compute (see docs/benchmarks.md, "What a disk read costs the compute"). In RAM, batch
        # 52 peaked at 4.75 GiB and 56 passed the cap on 2026-12-01 while the CPU cache was still copied
        # to float32 for attention; read in place (engine/kernels/attention.c) a batch-52 buffer of
        # 0.23 GiB is gone, so the climb goes on in steps of 4: in set attn-2026-12-01 batch 56 peaked
        # at 4.80 GiB and 60 passed the cap after 633 s. (4-bit weights and cache at batch 64 ran at
        # 5.6 s a step, against 2.2 s of 4-bit matmuls, in set kernel-2026-11-30.) Since prefill's
        # float working copies are dropped when decode starts (schedule.run_layers), batch 56 peaks
        # at 4.03 GiB instead of 4.90 and 72 at 4.85 (one micro-batch: the kernel takes 256 rows)
        engine_runs={(32, 256): [((48, 1), ["--compress-weight"]),
                                 ((48, 1), ["--compress-weight"], W_CPU_CACHE_CPU),
                                 ((56, 1), ["--compress-weight"], W_CPU_CACHE_CPU),
                                 ((64, 1), ["--compress-weight"], W_CPU_CACHE_CPU),
                                 ((72, 1), ["--compress-weight"], W_CPU_CACHE_CPU),
                                 ((80, 1), ["--compress-weight"], W_CPU_CACHE_CPU)]},
        in_memory_batch={(512, 32): 4, (32, 64): 16},
        # the engine's larger batch at transformers' peak RSS (its batch-16 run: 7.73 GiB, the engine's
        # 6.47; 16 more sequences of 96 positions add 0.6 GB of fp32 cache)
        in_memory_larger={(32, 64): 32},
        # rounds alternate on and off: the disk's rate drifts between 0.6 and 2.9 GB/s within minutes here.
        # Prefill is compute-bound and takes the same time either way (8 s of an 18 s run at gen 16 with
        # 4-bit weights), so a second case generates 64 tokens, where decode (read and compute about
        # even with 4-bit weights at batch 16) is most of the run
        overlap=[dict(shape=(32, 16), block=(16, 1), variants=[[], ["--compress-weight"]], rounds=3),
                 dict(shape=(32, 64), block=(16, 1), variants=[["--compress-weight"]], rounds=3)],
    ),
    "quick": dict(
        model="opt-125m", cap_gib=1.6,
        shapes=[(32, 8)],
        accelerate_max_memory="200MiB",
        accelerate_batches={(32, 8): [4]},
        engine_blocks={(32, 8): [(8, 1)]},
        in_memory_batch={(32, 8): 4},
        overlap=[dict(shape=(16, 8), block=(8, 1))],
    ),
}


@dataclass
class Row:
    key: str                   # the plan group it belongs to (e.g. "acc-p512g32")
    group: str                 # "capped", "in_memory", "overlap"
    system: str                # transformers | accelerate | engine
    label: str
    shape: tuple[int, int]     # (prompt_len, gen_len)
    batch: int                 # effective batch (block size)
    cmd: list[str]
    json_path: Path
    capped: bool = False
    round: int | None = None   # which of several alternating rounds (None: the row is run once)
    run: dict = field(default_factory=dict)
    probes: list = field(default_factory=list)

    @property
    def result(self) -> dict:
        return self.run.get("result") or {}

    @property
    def ok(self) -> bool:
        return bool(self.result)

    def feasible(self, cap: int) -> bool:
        return self.ok and self.run["peak_rss_bytes"] <= cap


# ---- model arithmetic ------------------------------------------------------------------------------
def model_shape(ckpt: Path) -> dict:
    c = json.loads((ckpt / "config.json").read_text())
    return dict(h=c["hidden_size"], layers=c["num_hidden_layers"], ffn=c["ffn_dim"], vocab=c["vocab_size"])


def flops(m: dict, batch: int, prompt: int, gen: int) -> float:
    """Matmul + attention FLOPs of prefill (prompt tokens) and gen - 1 decode steps, LM head per new token."""
    h, L, f, v = m["h"], m["layers"], m["ffn"], m["vocab"]
    per_token = 2 * L * (4 * h * h + 2 * h * f)                # q, k, v, out, fc1, fc2
    attn_prefill = 4 * h * L * prompt * (prompt + 1) / 2      # QK^T and AV over causal keys
    attn_decode = sum(4 * h * L * (prompt + j + 1) for j in range(1, gen))
    head = 2 * h * v * gen                                   # one position per generated token
    return batch * (per_token * (prompt + gen - 1) + attn_prefill + attn_decode + head)


def disk_bytes(row: Row) -> int:
    """Bytes one run must read from disk: weights homed on disk, once per forward pass (gen passes)."""
    r = row.result
    passes = row.shape[1]
    if row.system == "engine":
        return (r.get("held_weight_bytes") or {}).get("disk", 0) * passes
    return r.get("disk_weight_bytes", 0) * passes


# ---- commands ---------------------------------------------------------------------------------------
def hf_cmd(ckpt, batch, shape, out, max_memory=None, offload=None) -> list[str]:
    cmd = [PY, "benchmarks/_hf_generate.py", "--model", str(ckpt), "--batch", str(batch),
           "--prompt-len", str(shape[0]), "--gen-len", str(shape[1]), "--json", str(out)]
    if max_memory:
        cmd += ["--max-memory", max_memory, "--offload-folder", str(offload)]
    return cmd


def engine_cmd(ckpt, block, shape, out, percent, offload, overlap=1, extra=()) -> list[str]:
    return [PY, "-m", "engine.bench", "--model", str(ckpt), "--percent", *map(str, percent),
            "--gpu-batch-size", str(block[0]), "--num-gpu-batches", str(block[1]),
            "--prompt-len", str(shape[0]), "--gen-len", str(shape[1]), "--overlap", str(overlap),
            "--offload-dir", str(offload), "--no-progress", "--json", str(out), *extra]


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


def doubled(batches: list, extra: int) -> list:
    """The candidate list continued by `extra` doublings of its last entry (a batch, or a
    (gpu_batch_size, num_gpu_batches) block whose growing member is doubled)."""
    out = list(batches)
    for _ in range(extra):
        last = out[-1]
        if isinstance(last, tuple):
            grow_k = len(out) > 1 and out[-2][0] == last[0]
            out.append((last[0], last[1] * 2) if grow_k else (last[0] * 2, last[1]))
        else:
            out.append(last * 2)
    return out


def best(rows: list[Row], system: str, shape, cap: int) -> Row | None:
    cands = [r for r in rows if r.group == "capped" and r.system == system and r.shape == shape
             and r.feasible(cap)]
    return max(cands, key=lambda r: r.result["total_tokens_per_s"], default=None)


def plan(mode: dict, ckpt: Path, work: Path) -> dict[str, list[Row]]:
    acc_off, eng_off = work / "accelerate_offload", work / "engine_offload"
    j = lambda name: work / "json" / f"{name}.json"
    groups: dict[str, list[Row]] = {}
    no_climb = mode.get("no_climb", set())
    for shape in mode["shapes"]:
        tag = f"p{shape[0]}g{shape[1]}"
        extra = {system: 0 if shape in no_climb else n for system, n in mode.get("extra_doublings", {}).items()}
        runs = [(*run, W_DISK_CACHE_CPU)[:3] for run in mode.get("engine_runs", {}).get(shape) or [
            (block, []) for block in doubled(mode["engine_blocks"][shape], extra.get("engine", 0))]]
        groups[f"acc-{tag}"] = [
            Row(f"acc-{tag}", "capped", "accelerate", f"accelerate-{tag}-b{b}", shape, b,
                hf_cmd(ckpt, b, shape, j(f"acc-{tag}-b{b}"), mode["accelerate_max_memory"], acc_off),
                j(f"acc-{tag}-b{b}"), capped=True)
            for b in doubled(mode["accelerate_batches"][shape], extra.get("accelerate", 0))]
        groups[f"eng-{tag}"] = [
            Row(f"eng-{tag}", "capped", "engine", f"engine-{tag}-b{g}x{k}{_flag_tag(flags, percent)}", shape, g * k,
                engine_cmd(ckpt, (g, k), shape, j(f"eng-{tag}-b{g}x{k}{_flag_tag(flags, percent)}"), percent,
                           eng_off, extra=flags),
                j(f"eng-{tag}-b{g}x{k}{_flag_tag(flags, percent)}"), capped=True)
            for (g, k), flags, percent in runs]
        b = mode["in_memory_batch"].get(shape)
        if b is None:
            continue
        groups[f"mem-{tag}"] = [
            Row(f"mem-{tag}", "in_memory", "transformers", f"transformers-{tag}-b{b}", shape, b,
                hf_cmd(ckpt, b, shape, j(f"hf-{tag}-b{b}")), j(f"hf-{tag}-b{b}")),
            *[Row(f"mem-{tag}", "in_memory", "engine", f"engine-mem-{tag}-b{eb}", shape, eb,
                  engine_cmd(ckpt, (eb, 1), shape, j(f"engmem-{tag}-b{eb}"), ALL_IN_MEMORY, eng_off),
                  j(f"engmem-{tag}-b{eb}"))
              for eb in [b] + [x for x in [mode.get("in_memory_larger", {}).get(shape)] if x]]]
    for case in mode["overlap"]:
        shape, (g, k) = case["shape"], case["block"]
        tag = f"p{shape[0]}g{shape[1]}"
        rounds = case.get("rounds", 1)
        key = _overlap_key(mode, case)
        groups[key] = [
            Row(key, "overlap", "engine", _overlap_label(case, o, flags, r), shape, g * k,
                engine_cmd(ckpt, (g, k), shape, j(f"ov{o}-{tag}{_flag_tag(flags)}{_round_tag(r)}"), W_DISK_CACHE_CPU,
                           eng_off, overlap=o, extra=flags),
                j(f"ov{o}-{tag}{_flag_tag(flags)}{_round_tag(r)}"), round=r + 1 if rounds > 1 else None)
            for r in range(rounds) for flags in case.get("variants", [[]]) for o in (1, 0)]
    return groups


def _overlap_key(mode: dict, case: dict) -> str:
    """The plan group of an overlap case: "overlap" for the first (the name older runs saved),
    "overlap-p32g64" and so on for the others."""
    p, gen = case["shape"]
    return "overlap" if case is mode["overlap"][0] else f"overlap-p{p}g{gen}"


def _overlap_label(case: dict, overlap: int, flags, r: int) -> str:
    """The label of an overlap row: on or off, extra engine flags, round r (0-based)."""
    (p, gen), (g, k) = case["shape"], case["block"]
    return f"engine-overlap{overlap}-p{p}g{gen}-b{g}x{k}{_flag_tag(flags)}{_round_tag(r)}"


def _round_tag(r: int) -> str:
    """A label suffix for round r (0-based) of repeated runs; round 1 keeps single-round labels."""
    return f"-round{r + 1}" if r else ""


def _flag_tag(flags, percent=W_DISK_CACHE_CPU) -> str:
    """A label suffix for extra engine flags and a placement other than weights on disk ("" for
    neither, so older labels stay valid for --resume)."""
    where = "" if tuple(percent) == W_DISK_CACHE_CPU else "-percent-" + "-".join(map(str, percent))
    return "".join("-" + f.removeprefix("--") for f in flags) + where


# ---- reporting --------------------------------------------------------------------------------------
def roofline(row: Row, m: dict) -> dict:
    mm = sum(p["matmul_flops"] for p in row.probes) / len(row.probes)
    bw = sum(p["disk_read_bytes_per_s"] for p in row.probes) / len(row.probes)
    fl = flops(m, row.batch, *row.shape)
    db = disk_bytes(row) if row.ok else 0
    t_min = max(fl / mm, db / bw)
    out = {"matmul_flops": mm, "disk_bw": bw, "flops": fl, "disk_bytes": db, "t_min": t_min,
           "bound": "disk" if db / bw > fl / mm else "compute"}
    if row.ok:
        t = row.result["prefill_s"] + row.result["decode_s"]
        out["t"] = t
        out["frac"] = t_min / t
    return out


def fmt_row(row: Row, m: dict, cap: int | None) -> list:
    r, run = row.result, row.run
    rf = roofline(row, m)
    if row.system == "engine":
        p = r.get("policy", {})
        conf = (f"w {p.get('w_gpu_percent', 0):g}/{p.get('w_cpu_percent', 0):g}/disk, cache "
                f"{p.get('cache_gpu_percent', 0):g}/{p.get('cache_cpu_percent', 0):g}, "
                f"{p.get('gpu_batch_size', '?')}x{p.get('num_gpu_batches', '?')}, overlap {int(p.get('overlap', 0))}"
                + (", 4-bit weights" if p.get("compress_weight") else "") + (", 4-bit cache" if p.get("compress_cache") else "")
                if r else "")
        if r and row.round:
            conf += f", round {row.round}"
    elif row.system == "accelerate":
        conf = f"max_memory {r.get('max_memory')}, {r.get('placement')}" if r else ""
    else:
        conf = "fp32 in RAM"
    fits = "" if cap is None else ("yes" if row.feasible(cap) else "**no**")
    if not row.ok:
        return [row.system, row.batch, conf, "-", "-", "-", "-", f"{gib(run['peak_rss_bytes'])}",
                f"{gib(run['peak_anon_bytes'])} / {gib(run['peak_file_bytes'])}", fits,
                f"{rf['t_min']:.0f} ({rf['bound']})", run.get("error", "failed")]
    return [row.system, row.batch, conf, f"{r['total_tokens_per_s']:.2f}", f"{r['prefill_s']:.1f}",
            f"{r['decode_s'] / max(1, row.shape[1] - 1):.2f}", f"{r['prefill_tokens_per_s']:.1f}",
            gib(run["peak_rss_bytes"]), f"{gib(run['peak_anon_bytes'])} / {gib(run['peak_file_bytes'])}",
            fits, f"{rf['t_min']:.0f} ({rf['bound']})", f"{100 * rf['frac']:.0f}%"]


HEAD = ["system", "batch", "configuration", "tok/s", "prefill s", "decode s/step", "prefill tok/s",
        "peak RSS GiB", "anon / file GiB", "fits cap", "T_min s (bound)", "of roofline"]


def ratio(a: Row | None, b: Row | None) -> str:
    if not a or not b or not a.ok or not b.ok:
        return "n/a"
    return f"{a.result['total_tokens_per_s'] / b.result['total_tokens_per_s']:.2f}x"


def render(mode_name: str, mode: dict, rows: list[Row], m: dict, cap: int, started: str,
           loads: tuple, argv: list[str], wall: float, omp: str = "", suffix: str = "", tag: str | None = None) -> str:
    title = ("Offloading vs baselines" + (", OpenMP threads passive" if "omp_passive" in suffix else "")
             + (f", set `{tag}`" if tag else ""))
    out = [f"## {title} (`benchmarks/offload_vs_baselines.py`)", ""]
    times = sorted(r.run["started"] for r in rows if r.run.get("started"))
    commits = sorted({r.run["engine_commit"] for r in rows if r.run.get("engine_commit")})
    span = f"rows measured {times[0]} to {times[-1]}" if times else f"run {started}"
    inv = (f" (this invocation {wall / 60:.0f} min; load average at start {loads[0]}, at end {loads[1]})"
           if loads else "")
    out.append(f"Mode `{mode_name}`; {span}{inv}; engine commit(s) {', '.join(commits) or _doc.engine_commit()}; "
               "each row's load is in its log and the probes (2 cores shared with other jobs: absolute "
               f"rates move with the load; each row's roofline uses rates probed just before and after it). {omp}.")
    out.append("")
    out.append(f"Command: `python {' '.join(['benchmarks/offload_vs_baselines.py', *argv])}`")
    out.append("")
    out.append(f"Model: random-weight {mode['model']} written once with `save_pretrained` as fp16 safetensors "
               f"({gib(m['ckpt_bytes'])} GiB); every system reads that file. Prompts: random ids, the same "
               "for every system (seed 0); every sequence generates exactly gen tokens. transformers and "
               "Accelerate compute in fp32 (fp16 matmuls crawl on this CPU); the engine stores fp16 and "
               "computes in fp32.")
    out.append("")
    out.append(f"**Memory cap: {mode['cap_gib']:g} GiB of peak RSS** (kernel high-water mark of the process, "
               "file-backed pages included), below the fp16 model plus the KV cache of a large batch; a run "
               "that passes it is killed and marked **no**. Accelerate: `from_pretrained(device_map=\"auto\", "
               f"max_memory={{\"cpu\": \"{mode['accelerate_max_memory']}\"}}, offload_folder=...)`. "
               "Engine: weights 100% on disk (O_DIRECT), KV cache in CPU RAM (fp16; at gen 256 the weights "
               "are 4-bit and the cache 4-bit or fp16, and some rows hold the 4-bit weights in CPU RAM, as "
               "the configuration column says), one micro-batch per block unless shown. `anon / file` are the "
               "largest anonymous and file-backed RSS seen (not "
               "necessarily at the same moment): file = pages of the memory-mapped safetensors checkpoint, "
               "which Accelerate keeps mapped for the whole run (it reads its offloaded weights from it); the "
               "engine mapped it while loading until c92c345, and reads it with pread since.")
    out.append("")
    out.append("Roofline: T_min = max(FLOPs / fp32 matmul rate, disk bytes / O_DIRECT read rate); disk bytes = "
               "weights homed on disk x gen forward passes (for Accelerate: the bytes of its offloaded "
               "modules, which it actually re-reads from the page cache, not the disk). `of roofline` = "
               "T_min / measured time.")
    for shape in mode["shapes"]:
        tag = f"prompt {shape[0]}, gen {shape[1]}"
        srows = [r for r in rows if r.shape == shape and r.group in ("capped", "in_memory")]
        if not srows:
            continue
        out += ["", f"### {tag}", ""]
        table = [fmt_row(r, m, cap if r.group == "capped" else None) for r in srows]
        out.append(_doc.md_table(HEAD, table))
        ea, aa = best(rows, "engine", shape, cap), best(rows, "accelerate", shape, cap)
        mem = [r for r in rows if r.shape == shape and r.group == "in_memory"]
        hf = next((r for r in mem if r.system == "transformers"), None)
        em = next((r for r in mem if r.system == "engine" and hf and r.batch == hf.batch), None)
        larger = [r for r in mem if r.system == "engine" and hf and r.batch > hf.batch and r.ok]
        out.append("")
        if any(r.group == "capped" for r in srows):
            out.append(f"- Equal memory ({mode['cap_gib']:g} GiB): best feasible engine "
                       f"{_desc(ea)} vs best feasible Accelerate {_desc(aa)}: **{ratio(ea, aa)}**.")
        for system in ("engine", "accelerate"):
            tried = [r for r in rows if r.group == "capped" and r.system == system and r.shape == shape]
            if tried and tried[-1].feasible(cap):
                out.append(f"- {system}: the largest batch tried ({tried[-1].batch}) still fits the cap; its best "
                           "feasible batch may be larger (not measured in this run).")
        if mem:
            out.append(f"- Everything in memory, batch {hf.batch if hf else '?'}: engine vs transformers "
                       f"**{ratio(em, hf)}** (peak RSS {_rss(em)} vs {_rss(hf)} GiB).")
        for r in larger:
            fits = hf.ok and r.run["peak_rss_bytes"] <= hf.run["peak_rss_bytes"]
            out.append(f"- Larger batch in memory: engine batch {r.batch} at peak RSS {_rss(r)} GiB, "
                       f"{'within' if fits else 'above'} transformers' {_rss(hf)} GiB at batch {hf.batch}: "
                       f"{r.result['total_tokens_per_s']:.2f} tok/s, **{ratio(r, hf)}** transformers.")
        rows_probe = [p for r in srows for p in r.probes]
        if rows_probe:
            mms = [p["matmul_flops"] / 1e9 for p in rows_probe]
            bws = [p["disk_read_bytes_per_s"] / 1e9 for p in rows_probe]
            out.append(f"- Probes during these rows: fp32 matmul {min(mms):.0f}-{max(mms):.0f} GFLOP/s, "
                       f"O_DIRECT read {min(bws):.2f}-{max(bws):.2f} GB/s.")
    for case in mode["overlap"]:
        ov = [r for r in rows if r.key == _overlap_key(mode, case)]
        if ov:
            out += ["", *_overlap_section(case, ov, m)]
    if any(r.group == "overlap" for r in rows):
        out.append("- The ceiling this machine sets on overlap is measured by `benchmarks/disk_contention.py` "
                   "(section `What a disk read costs the compute`).")
    if _plotted(rows):
        out += ["", f"![throughput vs effective batch]({PLOT.stem}{suffix}.png)"]
    out += [""]
    out.append("Raw per-run logs and JSON: the `--work` folder (default /tmp/flexwrangle-bench).")
    return "\n".join(out)


def _plotted(rows: list[Row]) -> bool:
    """Whether a set has rows for the throughput plot (overlap rows are not plotted)."""
    return any(r.group != "overlap" for r in rows)


def _overlap_section(case: dict, ov: list[Row], m: dict) -> list[str]:
    """The table of one overlap case and, per engine-flag variant, overlap on vs off: total
    throughput (median of the alternating rounds) and the decode step alone (prefill takes the
    same compute-bound time either way)."""
    shape = case["shape"]
    out = [f"### Disk-bound: overlap on vs off (prompt {shape[0]}, gen {shape[1]}, "
           f"batch {ov[0].batch}, weights 100% on disk)", ""]
    out.append(_doc.md_table(HEAD, [fmt_row(r, m, None) for r in ov]))
    out.append("")
    by_label = {r.label: r for r in ov if r.ok}
    for flags in case.get("variants", [[]]):
        on, off = ([by_label[x] for x in (_overlap_label(case, o, flags, r)
                                          for r in range(case.get("rounds", 1))) if x in by_label]
                   for o in (1, 0))
        what = " ".join(flags).replace("--compress-weight", "4-bit weights") or "fp16 weights"
        if not on or len(on) != len(off):
            out.append(f"- Overlap on vs off, {what}: **n/a** (rounds missing).")
            continue
        med = lambda rs, k: statistics.median(r.result[k] for r in rs)
        pairs = [a.result["total_tokens_per_s"] / b.result["total_tokens_per_s"] for a, b in zip(on, off)]
        rounds = (f"median tok/s of {len(on)} alternating runs each; round by round "
                  f"{min(pairs):.2f}-{max(pairs):.2f}x" if len(on) > 1 else "one run each")
        step = lambda rs: med(rs, "decode_s") / max(1, shape[1] - 1)
        out.append(f"- Overlap on vs off, {what}: **{med(on, 'total_tokens_per_s') / med(off, 'total_tokens_per_s'):.2f}x** "
                   f"({rounds}). The decode step alone: {step(off):.2f} s off, {step(on):.2f} s on "
                   f"(**{step(off) / step(on):.2f}x**); prefill {med(off, 'prefill_s'):.1f} s off, "
                   f"{med(on, 'prefill_s'):.1f} s on.")
    return out


def _desc(r: Row | None) -> str:
    if not r:
        return "(none fits)"
    return f"(batch {r.batch}, {r.result['total_tokens_per_s']:.2f} tok/s, peak RSS {_rss(r)} GiB)"


def _rss(r: Row | None) -> str:
    return gib(r.run["peak_rss_bytes"]) if r and r.run else "?"


def plot(rows: list[Row], mode: dict, cap: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = [s for s in mode["shapes"] if any(r.shape == s and r.group != "overlap" for r in rows)] or mode["shapes"][:1]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2))
    axes = list(axes) if len(shapes) > 1 else [axes]
    style = {"engine": ("tab:blue", "o"), "accelerate": ("tab:red", "s"), "transformers": ("tab:gray", "^")}
    for ax, shape in zip(axes, shapes):
        for system, (color, marker) in style.items():
            for group, fill in (("capped", True), ("in_memory", False)):
                rs = sorted((r for r in rows if r.system == system and r.shape == shape and r.group == group
                             and r.ok), key=lambda r: r.batch)
                if not rs:
                    continue
                xs = [r.batch for r in rs]
                ys = [r.result["total_tokens_per_s"] for r in rs]
                name = f"{system} ({'RSS cap' if group == 'capped' else 'in RAM'})"
                ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if fill else ":",
                        markerfacecolor=color if fill else "white", label=name)
                for r in rs:
                    if group == "capped" and not r.feasible(cap):
                        ax.annotate("over cap", (r.batch, r.result["total_tokens_per_s"]), fontsize=7)
            killed = [r for r in rows if r.system == system and r.shape == shape and r.group == "capped"
                      and not r.feasible(cap)]
            if killed:
                ax.scatter([r.batch for r in killed], [0] * len(killed), marker="x", color=color, s=60,
                           label=f"{system}: over the cap")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("effective batch size")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"{mode['model']}, prompt {shape[0]}, gen {shape[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput vs batch (cap {mode['cap_gib']:g} GiB peak RSS for capped runs)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                   help="OMP_WAIT_POLICY=PASSIVE for every system (own work folder, section and plot)")
    p.add_argument("--tag", help="name a measurement set (own work folder, doc section and plot), so that a "
                                "partial run (--only) adds a section instead of replacing the main one")
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
    ckpt = Path(args.work) / f"{mode['model']}-fp16"
    print(f"checkpoint {ckpt} ...", flush=True)
    from benchmarks._harness import run_measured
    r = run_measured([PY, "benchmarks/_checkpoint.py", "--model", mode["model"], "--out", str(ckpt)])
    if r["rc"] != 0:
        raise SystemExit(f"writing the checkpoint failed: {r}")
    m = model_shape(ckpt)
    m["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    cap = int(mode["cap_gib"] * 2 ** 30)
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
    png = PLOT.with_name(PLOT.stem + suffix + ".png")
    plotted = _plotted(rows)
    if plotted:
        plot(rows, mode, cap, png if write else work / png.name)
    if write:
        _doc.write_section(SECTION + suffix, md)
        print(f"wrote {_doc.DOC}" + (f" and {png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
