"""The report of `offload_vs_baselines.py`: the roofline floor of each row, the markdown section of
docs/benchmarks.md and the throughput plot (one file, docs/offload_throughput.png, rewritten by
each run that writes the doc)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import _doc
from benchmarks._harness import REPO, gib
from benchmarks._offload_modes import Mode, OverlapCase
from benchmarks._offload_plan import Row, overlap_key, overlap_label

PLOT = REPO / "docs" / "offload_throughput.png"


# ---- model arithmetic and the roofline -----------------------------------------------------------
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


def render(mode_name: str, mode: Mode, rows: list[Row], m: dict, cap: int, started: str,
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
    out.append(f"Model: random-weight {mode.model} written once with `save_pretrained` as fp16 safetensors "
               f"({gib(m['ckpt_bytes'])} GiB); every system reads that file. Prompts: random ids, the same "
               "for every system (seed 0); every sequence generates exactly gen tokens. transformers and "
               "Accelerate compute in fp32 (fp16 matmuls crawl on this CPU); the engine stores fp16 and "
               "computes in fp32.")
    out.append("")
    out.append(f"**Memory cap: {mode.cap_gib:g} GiB of peak RSS** (kernel high-water mark of the process, "
               "file-backed pages included), below the fp16 model plus the KV cache of a large batch; a run "
               "that passes it is killed and marked **no**. Accelerate: `from_pretrained(device_map=\"auto\", "
               f"max_memory={{\"cpu\": \"{mode.accelerate_max_memory}\"}}, offload_folder=...)`. "
               "Engine: weights 100% on disk (O_DIRECT), KV cache in CPU RAM (fp16; at gen 256 the weights "
               "are 4-bit and the cache 4-bit or fp16, and some rows hold the 4-bit weights in CPU RAM, as "
               "the configuration column says), one micro-batch per block unless shown. `anon / file` are the "
               "largest anonymous and file-backed RSS seen (not "
               "necessarily at the same moment): file = pages of the memory-mapped safetensors checkpoint, "
               "which Accelerate keeps mapped for the whole run (it reads its offloaded weights from it); the "
               "engine reads it with pread instead of mapping it.")
    out.append("")
    out.append("Roofline: T_min = max(FLOPs / fp32 matmul rate, disk bytes / O_DIRECT read rate); disk bytes = "
               "weights homed on disk x gen forward passes (for Accelerate: the bytes of its offloaded "
               "modules, which it actually re-reads from the page cache, not the disk). `of roofline` = "
               "T_min / measured time.")
    for shape in mode.shapes:
        heading = f"prompt {shape[0]}, gen {shape[1]}"
        srows = [r for r in rows if r.shape == shape and r.group in ("capped", "in_memory")]
        if not srows:
            continue
        out += ["", f"### {heading}", ""]
        table = [fmt_row(r, m, cap if r.group == "capped" else None) for r in srows]
        out.append(_doc.md_table(HEAD, table))
        ea, aa = best(rows, "engine", shape, cap), best(rows, "accelerate", shape, cap)
        mem = [r for r in rows if r.shape == shape and r.group == "in_memory"]
        hf = next((r for r in mem if r.system == "transformers"), None)
        em = next((r for r in mem if r.system == "engine" and hf and r.batch == hf.batch), None)
        larger = [r for r in mem if r.system == "engine" and hf and r.batch > hf.batch and r.ok]
        out.append("")
        if any(r.group == "capped" for r in srows):
            out.append(f"- Equal memory ({mode.cap_gib:g} GiB): best feasible engine "
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
    for case in mode.overlap:
        ov = [r for r in rows if r.key == overlap_key(mode, case)]
        if ov:
            out += ["", *_overlap_section(case, ov, m)]
    if any(r.group == "overlap" for r in rows):
        out.append("- The ceiling this machine sets on overlap is measured by `benchmarks/disk_contention.py` "
                   "(section `What a disk read costs the compute`).")
    if has_plot(rows):
        out += ["", f"![throughput vs effective batch]({PLOT.name})"]
    out += [""]
    out.append("Raw per-run logs and JSON: the `--work` folder (default /tmp/flexwrangle-bench).")
    return "\n".join(out)


def has_plot(rows: list[Row]) -> bool:
    """Whether a set has rows for the throughput plot (overlap rows are not plotted)."""
    return any(r.group != "overlap" for r in rows)


def _overlap_section(case: OverlapCase, ov: list[Row], m: dict) -> list[str]:
    """The table of one overlap case and, per engine-flag variant, overlap on vs off: total
    throughput (median of the alternating rounds) and the decode step alone (prefill takes the
    same compute-bound time either way)."""
    shape = case.shape
    out = [f"### Disk-bound: overlap on vs off (prompt {shape[0]}, gen {shape[1]}, "
           f"batch {ov[0].batch}, weights 100% on disk)", ""]
    out.append(_doc.md_table(HEAD, [fmt_row(r, m, None) for r in ov]))
    out.append("")
    by_label = {r.label: r for r in ov if r.ok}
    for flags in case.variants:
        on, off = ([by_label[x] for x in (overlap_label(case, o, flags, r)
                                          for r in range(case.rounds)) if x in by_label]
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


def plot(rows: list[Row], mode: Mode, cap: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = [s for s in mode.shapes if any(r.shape == s and r.group != "overlap" for r in rows)] or mode.shapes[:1]
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
        ax.set_title(f"{mode.model}, prompt {shape[0]}, gen {shape[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput vs batch (cap {mode.cap_gib:g} GiB peak RSS for capped runs)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best(rows: list[Row], system: str, shape, cap: int) -> Row | None:
    cands = [r for r in rows if r.group == "capped" and r.system == system and r.shape == shape
             and r.feasible(cap)]
    return max(cands, key=lambda r: r.result["total_tokens_per_s"], default=None)
