"""The rows `offload_vs_baselines.py` measures: one `Row` per run, grouped by what it is compared in
(`acc-p512g32`, `eng-p512g32`, `mem-p512g32`, `overlap`, ...), each with its command line.

Labels and JSON names are the keys that `--resume` matches against rows.json, so they stay the
same for the same run: a flag or placement adds a suffix only when it differs from the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._harness import PY
from benchmarks._offload_modes import ALL_IN_MEMORY, W_DISK_CACHE_CPU, Mode, OverlapCase


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


# ---- the plan ---------------------------------------------------------------------------------------
def doubled(batches, extra: int) -> list:
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


def plan(mode: Mode, ckpt: Path, work: Path) -> dict[str, list[Row]]:
    """Every row of `mode`, by group, in the order they run (a capped group climbs in this order)."""
    acc_off, eng_off = work / "accelerate_offload", work / "engine_offload"
    j = lambda name: work / "json" / f"{name}.json"
    groups: dict[str, list[Row]] = {}
    for sp in mode.plans:
        shape = sp.shape
        tag = f"p{shape[0]}g{shape[1]}"
        extra = {system: n if sp.climb_on else 0 for system, n in mode.extra_doublings.items()}
        runs = [(r.block, list(r.flags), r.percent) for r in sp.engine_runs] or [
            (block, [], W_DISK_CACHE_CPU) for block in doubled(sp.engine_blocks, extra.get("engine", 0))]
        groups[f"acc-{tag}"] = [
            Row(f"acc-{tag}", "capped", "accelerate", f"accelerate-{tag}-b{b}", shape, b,
                hf_cmd(ckpt, b, shape, j(f"acc-{tag}-b{b}"), mode.accelerate_max_memory, acc_off),
                j(f"acc-{tag}-b{b}"), capped=True)
            for b in doubled(sp.accelerate_batches, extra.get("accelerate", 0))]
        groups[f"eng-{tag}"] = [
            Row(f"eng-{tag}", "capped", "engine", f"engine-{tag}-b{g}x{k}{_flag_tag(flags, percent)}", shape, g * k,
                engine_cmd(ckpt, (g, k), shape, j(f"eng-{tag}-b{g}x{k}{_flag_tag(flags, percent)}"), percent,
                           eng_off, extra=flags),
                j(f"eng-{tag}-b{g}x{k}{_flag_tag(flags, percent)}"), capped=True)
            for (g, k), flags, percent in runs]
        b = sp.in_memory_batch
        if b is None:
            continue
        groups[f"mem-{tag}"] = [
            Row(f"mem-{tag}", "in_memory", "transformers", f"transformers-{tag}-b{b}", shape, b,
                hf_cmd(ckpt, b, shape, j(f"hf-{tag}-b{b}")), j(f"hf-{tag}-b{b}")),
            *[Row(f"mem-{tag}", "in_memory", "engine", f"engine-mem-{tag}-b{eb}", shape, eb,
                  engine_cmd(ckpt, (eb, 1), shape, j(f"engmem-{tag}-b{eb}"), ALL_IN_MEMORY, eng_off),
                  j(f"engmem-{tag}-b{eb}"))
              for eb in [b] + [x for x in [sp.in_memory_larger] if x]]]
    for case in mode.overlap:
        shape, (g, k) = case.shape, case.block
        tag = f"p{shape[0]}g{shape[1]}"
        key = overlap_key(mode, case)
        groups[key] = [
            Row(key, "overlap", "engine", overlap_label(case, o, flags, r), shape, g * k,
                engine_cmd(ckpt, (g, k), shape, j(f"ov{o}-{tag}{_flag_tag(flags)}{_round_tag(r)}"), W_DISK_CACHE_CPU,
                           eng_off, overlap=o, extra=list(flags)),
                j(f"ov{o}-{tag}{_flag_tag(flags)}{_round_tag(r)}"), round=r + 1 if case.rounds > 1 else None)
            for r in range(case.rounds) for flags in case.variants for o in (1, 0)]
    return groups


def overlap_key(mode: Mode, case: OverlapCase) -> str:
    """The plan group of an overlap case: "overlap" for the first (so that rows.json files and
    --only / --rerun arguments naming it stay valid), "overlap-p32g64" and so on for the others."""
    p, gen = case.shape
    return "overlap" if case is mode.overlap[0] else f"overlap-p{p}g{gen}"


def overlap_label(case: OverlapCase, overlap: int, flags, r: int) -> str:
    """The label of an overlap row: on or off, extra engine flags, round r (0-based)."""
    (p, gen), (g, k) = case.shape, case.block
    return f"engine-overlap{overlap}-p{p}g{gen}-b{g}x{k}{_flag_tag(flags)}{_round_tag(r)}"


def _round_tag(r: int) -> str:
    """A label suffix for round r (0-based) of repeated runs; round 1 keeps single-round labels."""
    return f"-round{r + 1}" if r else ""


def _flag_tag(flags, percent=W_DISK_CACHE_CPU) -> str:
    """A label suffix for extra engine flags and a placement other than weights on disk ("" for
    neither, so that a plain run keeps its plain label)."""
    where = "" if tuple(percent) == W_DISK_CACHE_CPU else "-percent-" + "-".join(map(str, percent))
    return "".join("-" + f.removeprefix("--") for f in flags) + where
