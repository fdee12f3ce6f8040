"""Automatic policy: a linear program (pulp, CBC) that places one block, inside a search over batch shapes.

The program is exact about the engine's rounding: weights go to tiers tensor by tensor
(`placement.tier_at`: a tensor's midpoint against the percentages) and the cache by whole
sequences (`placement.split_counts`), so the placement is chosen among the percentages where a
tensor or a sequence changes tier (binary selectors), and the fractions `weight_frac[tier]`,
`cache_frac[tier]` follow from them. Its times and bytes come from `engine.cost_model`. An outer
search enumerates `gpu_batch_size`, `num_gpu_batches` and compression, pruned by an upper bound
on throughput.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import pulp
import torch

from .config import ModelConfig
from .cost_model import (PROCESS_BASE_BYTES, Placement, Setup, cache_row_bytes, caps_for, make_setup, memory_terms,
                         pool_copies, predict, preflight, storage_dtype, thresholds, transient_bytes, weight_elems)
from .cost_times import compute_mb, rate, slot_bounds
from .hardware import Hardware, load_hardware
from .placement import CACHE_READS_IN_FLIGHT, Precision
from .policy import TIERS, Policy
from .accounting import MemoryBudgetError, fmt_bytes

class PolicySearchError(MemoryBudgetError):
    """No policy fits the memory caps; `shortfall` maps each short tier to the missing bytes."""

    def __init__(self, message: str, shortfall: dict[str, int]):
        super().__init__(message)
        self.shortfall = shortfall


@dataclass(frozen=True)
class PolicyChoice:
    """The chosen policy with its predicted throughput and peaks (data; nothing printed)."""
    policy: Policy
    predicted_tokens_per_s: float
    predicted_prefill_s: float
    predicted_decode_s: float
    predicted_peaks: dict            # tier -> bytes
    hardware: Hardware
    predicted_preflight: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)    # "weight_frac"/"cache_frac" -> tier -> share
    binding_constraints: tuple = ()  # named LP constraints that are tight at the optimum
    candidates_solved: int = 0
    search_s: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready figures (the policy as a dict; the hardware by host and key rates only)."""
        return {"policy": self.policy.to_dict(), "predicted_tokens_per_s": self.predicted_tokens_per_s,
                "predicted_prefill_s": self.predicted_prefill_s, "predicted_decode_s": self.predicted_decode_s,
                "predicted_peaks": dict(self.predicted_peaks), "predicted_preflight": dict(self.predicted_preflight),
                "placement": self.placement, "binding_constraints": list(self.binding_constraints),
                "candidates_solved": self.candidates_solved, "search_s": self.search_s,
                "hardware": {"host": self.hardware.host, "measured_at": self.hardware.measured_at,
                             "matmul_flops": self.hardware.matmul_flops,
                             "disk_read_bytes_per_s": self.hardware.disk_read_bytes_per_s}}


# ---- the program -----------------------------------------------------------------------------------
def _name(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m")


def placement_lp(st: Setup, elastic: bool = False) -> tuple[pulp.LpProblem, Placement, dict]:
    """The placement program for one candidate batch shape: minimise the block's seconds.

    Variables: binary selectors of the weight thresholds, cache sequence counts and activation
    tier; `weight_frac_<tier>` and `cache_frac_<tier>` (shares that follow from them); one time per
    (phase, layer slot). With `elastic`, `short_<tier>` bytes may be added to each cap (at a cost
    dominating everything else): the optimum then says which tier is short and by how much.
    """
    prob = pulp.LpProblem(f"placement_b{st.b}_nb{st.nb}", pulp.LpMinimize)
    binary = lambda name: prob.add_variable(name, 0, 1, cat=pulp.LpBinary)
    g_vals = thresholds(st.kinds)
    w_gpu = [(g, binary(f"w_gpu_pct_{_name(g)}")) for g in g_vals]
    w_gc = [(g, binary(f"w_gpu_cpu_pct_{_name(g)}")) for g in g_vals]
    counts = range(0, st.b + 1, max(1, st.b // 64))      # whole sequences; 1/64 steps above 64
    c_gpu = [(n, binary(f"cache_gpu_seqs_{n}")) for n in counts]
    c_gc = [(n, binary(f"cache_gpu_cpu_seqs_{n}")) for n in counts]
    act = {t: binary(f"act_on_{t}") for t in TIERS}
    for label, sel in (("weight_gpu_threshold", w_gpu), ("weight_gpu_cpu_threshold", w_gc),
                       ("cache_gpu_count", c_gpu), ("cache_gpu_cpu_count", c_gc)):
        prob += pulp.lpSum(z for _, z in sel) == 1, f"one_{label}"
    prob += pulp.lpSum(act.values()) == 1, "act_on_one_tier"
    prob += (pulp.lpSum(g * z for g, z in w_gc) >= pulp.lpSum(g * z for g, z in w_gpu)), "weight_cpu_share_nonnegative"
    prob += (pulp.lpSum(n * z for n, z in c_gc) >= pulp.lpSum(n * z for n, z in c_gpu)), "cache_cpu_share_nonnegative"
    p = Placement(st.b, w_gpu, w_gc, c_gpu, c_gc, act)

    total = weight_elems(st)
    weight_frac = {t: prob.add_variable(f"weight_frac_{t}", 0, 1) for t in TIERS}
    cache_frac = {t: prob.add_variable(f"cache_frac_{t}", 0, 1) for t in TIERS}
    elems = {t: 0 for t in TIERS}
    for name, count in st.counts.items():
        on = p.weights(st.kinds[name], "elems", lambda x, tier: x.elems)
        elems = {t: elems[t] + count * on[t] for t in TIERS}
    seqs = p.cache("sequences", lambda tier, n: n)
    for t in TIERS:
        prob += weight_frac[t] == elems[t] * (1 / total), f"weight_frac_{t}_definition"
        prob += cache_frac[t] == seqs[t] * (1 / st.b), f"cache_frac_{t}_definition"

    seconds = {}
    for (kind, nxt), count in st.slots.items():
        for phase in ("prefill", "decode"):
            var = prob.add_variable(f"{phase}_time_{kind}_to_{nxt}", 0)
            seconds[(phase, kind, nxt)] = (var, count)
            for bound, expr in slot_bounds(st, p, kind, nxt, phase).items():
                prob += var >= expr, f"{phase}_{kind}_to_{nxt}_{bound}"
    prefill = pulp.lpSum(count * v for (ph, _, _), (v, count) in seconds.items() if ph == "prefill")
    step = pulp.lpSum(count * v for (ph, _, _), (v, count) in seconds.items() if ph == "decode")
    block_seconds = prefill + max(0, st.gen - 1) * step

    m = memory_terms(st, p)
    short = {t: prob.add_variable(f"short_{t}", 0) if elastic else 0 for t in (*TIERS, "ram")}
    # the buffer pool keeps per tensor shape as many working copies as two neighbouring layers hold at
    # once (pool_copies; per phase: decode may borrow scratch where prefill borrowed whole copies); counting them
    # against the cap keeps the pool from trimming and re-faulting buffers every layer
    pooled = {}
    for phase, by_shape in m["pool_counts"].items():
        pooled[phase] = 0
        for key, counts in by_shape.items():
            shape, dtype = key
            label = f"{phase}_" + "x".join(map(str, shape)) + "_" + str(dtype).removeprefix("torch.")
            copies = prob.add_variable(f"gpu_pool_copies_{label}", 0)
            for a, c in st.slots:
                prob += copies >= pool_copies(counts, a, c), f"gpu_pool_copies_{label}_{a}_then_{c}"
            pooled[phase] += m["pool_bytes"][phase][key] * copies
    work_max = prob.add_variable("gpu_largest_layer_working_copy", 0)
    for k, expr in m["working_each"].items():
        prob += work_max >= expr, f"gpu_working_copy_{k}"
    need = preflight(st, m, work_max)
    peak = {}
    for t in TIERS:
        base = m["weights"][t] + m["cache"][t]
        peak[("prefill", t)] = base + m["act_prefill"][t] + (pooled["prefill"] if t == "gpu" else 0)
        peak[("decode", t)] = base + m["act_decode"][t] + (pooled["decode"] + m["cache_copies"] if t == "gpu" else 0)
        for phase in ("prefill", "decode"):
            prob += peak[(phase, t)] <= st.caps[t] + short[t], f"{t}_peak_{phase}"
        prob += need[t] <= st.caps[t] + short[t], f"{t}_engine_preflight"
    if not st.cuda:   # both tiers live in the same RAM, with the untracked temporaries of compute
        for phase in ("prefill", "decode"):
            prob += (peak[(phase, "gpu")] + peak[(phase, "cpu")] + m["transient"] + PROCESS_BASE_BYTES
                     <= st.hw.ram_available + short["ram"]), f"ram_in_use_{phase}"
    if elastic:
        prob += pulp.lpSum(short.values()) * 1e3 + block_seconds
    else:
        prob += block_seconds
    info = {"weight_frac": weight_frac, "cache_frac": cache_frac, "short": short, "prefill": prefill, "step": step}
    return prob, p, info


def _solve(prob: pulp.LpProblem) -> str:
    with warnings.catch_warnings():   # PuLP 3.3 flags its bundled CBC as deprecated; it is the one CBC here
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=1e-6, timeLimit=20))
    return pulp.LpStatus[prob.status]


def _chosen(sel) -> float:
    return next(k for k, z in sel if (z.value() or 0) > 0.5)


def _policy_from(st: Setup, p: Placement, sep_layer: bool) -> Policy:
    g, gc = _chosen(p.w_gpu), _chosen(p.w_gpu_cpu)
    n_g, n_gc = _chosen(p.c_gpu), _chosen(p.c_gpu_cpu)
    act = next(t for t, z in p.act.items() if (z.value() or 0) > 0.5)
    return Policy(gpu_batch_size=st.b, num_gpu_batches=st.nb, w_gpu_percent=g, w_cpu_percent=round(gc - g, 6),
                  cache_gpu_percent=100 * n_g / st.b, cache_cpu_percent=100 * (n_gc - n_g) / st.b,
                  act_gpu_percent=100.0 if act == "gpu" else 0.0, act_cpu_percent=100.0 if act == "cpu" else 0.0,
                  overlap=st.overlap, sep_layer=sep_layer, cpu_cache_compute=st.cpu_cache_compute,
                  compress_weight=st.compress_weight, compress_cache=st.compress_cache, int8_matmul=st.int8)


# ---- the search ------------------------------------------------------------------------------------
def _lower_bound_seconds(st: Setup) -> float:
    """Seconds per block that no placement can beat, for pruning: per step, the compute; the disk
    reads of the weights that cannot fit the gpu and cpu caps; on CPU, compute plus converting
    every weight not on the gpu tier (and dequantizing every 4-bit one)."""
    hw, t = st.hw, st.s + max(0, st.gen - 2) / 2
    tensors = [(x, st.counts[k]) for k, kind in st.kinds.items() for x in kind.tensors]
    quant = sum(x.elems * n for x, n in tensors if x.quantized)
    min_bytes = min(x.stored_bytes("cpu") / x.elems for x, _ in tensors)             # cheapest bytes per element
    room = st.caps["gpu"] + st.caps["cpu"] if st.cuda else min(st.caps["gpu"] + st.caps["cpu"], st.hw.ram_available)
    held = sum(x.elems * n for x, n in tensors if not x.tied)            # a tied head holds nothing
    disk_read = max(0.0, held - room / min_bytes) * min_bytes / hw.disk_read_bytes_per_s
    widen = 0.0
    if not st.cuda:
        widen = quant / rate(st, "dequant_elems_per_s")
        if not st.compress_weight and st.storage_bytes != st.itemsize:
            plain = sum(x.elems * n for x, n in tensors if not x.int8)      # int8 weights are never widened
            widen += max(0.0, plain - st.caps["gpu"] / st.itemsize) / rate(st, "convert_elems_per_s")
    total = 0.0
    for phase, steps in (("prefill", 1), ("decode", max(0, st.gen - 1))):
        compute = sum(count * st.nb * compute_mb(st, kind, phase, t) for (kind, _), count in st.slots.items())
        work = widen
        if st.compress_cache and not st.cuda:          # every cache row is (de)quantized wherever it lives
            rows = 2 * st.cfg.kv_dim * st.b * st.nb * st.cfg.num_layers
            work += rows * (st.s if phase == "prefill" else 1) / rate(st, "quant_elems_per_s")
            work += rows * t / rate(st, "cache_dequant_elems_per_s") if phase == "decode" else 0.0
        if st.overlap:
            step = max(compute, disk_read + work, compute + (0.0 if st.cuda else work))
        else:
            step = compute + disk_read + work
        total += steps * step
    return total


def _surely_too_big(st: Setup) -> bool:
    """Placement-independent memory needs that already exceed the caps (a quick filter before the program)."""
    cfg = st.cfg
    # the engine's pre-flight reserve for cache reads, were every sequence's keys and values copied
    copies = CACHE_READS_IN_FLIGHT * 2 * st.b * st.max_len * cfg.kv_dim * st.itemsize
    transient = transient_bytes(st)
    weights = sum(min(x.stored_bytes(t) for t in TIERS) * st.counts[k]
                  for k, kind in st.kinds.items() for x in kind.tensors if not x.tied)
    row = min(cache_row_bytes(st, "cpu", st.b), cache_row_bytes(st, "gpu", st.b))
    cache = row * st.max_len * cfg.num_layers * st.nb
    total = st.caps["gpu"] + st.caps["cpu"] + st.caps["disk"]
    ram = not st.cuda and copies + transient + PROCESS_BASE_BYTES > st.hw.ram_available
    return copies > st.caps["gpu"] or weights + cache + copies > total or ram


def search_policy(config: ModelConfig, hardware: Hardware, prompt_len: int, gen_len: int, *,
                  gpu_mem=None, cpu_mem=None, disk_mem=None, compress_weight: bool | None = None,
                  compress_cache: bool | None = None, storage_bytes: int = 2, max_block_size: int = 64,
                  overlap: bool = True, sep_layer: bool = True, int8_matmul: bool | None = False) -> PolicyChoice:
    """The fastest policy (by the cost model) that fits the caps, with its predicted figures.

    Caps default to the hardware's capacities. `compress_weight`/`compress_cache` None lets the
    search decide; True/False forces. So does `int8_matmul` (Policy.int8_matmul, which changes
    answers slightly: off unless asked for). Raises PolicySearchError (a MemoryBudgetError) naming the
    tier that is short, and by how much, when even the smallest policy does not fit.
    """
    started = time.perf_counter()
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len ({prompt_len}) and gen_len ({gen_len}) must be at least 1")
    if prompt_len + gen_len > config.max_positions:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s context "
                         f"window of {config.max_positions}")
    caps = caps_for(hardware, gpu_mem, cpu_mem, disk_mem)
    cuda = hardware.compute_device == "cuda"
    options = lambda forced: (forced,) if forced is not None else (False, True)
    shapes = [(b, nb) for b in _powers(max_block_size) for nb in _powers(max_block_size // b)]
    candidates = []
    for cw in options(compress_weight):
        for cc in options(compress_cache):
            for ccc in ((False, True) if cuda else (False,)):
                for i8 in options(int8_matmul) if not cuda else (False,):
                    for b, nb in shapes:
                        precision = Precision(hardware.compute_device, storage_dtype(storage_bytes),
                                              compress_weight=cw, compress_cache=cc, cpu_cache_compute=ccc,
                                              int8_matmul=i8)
                        st = make_setup(config, hardware, prompt_len=prompt_len, gen_len=gen_len,
                                        gpu_batch_size=b, num_gpu_batches=nb, precision=precision,
                                        overlap=overlap, sep_layer=sep_layer, caps=caps)
                        candidates.append((b * nb * gen_len / _lower_bound_seconds(st), st))
    candidates.sort(key=lambda c: -c[0])
    state = {"best": None, "rate": 0.0, "solved": 0, "infeasible": [], "tried": set()}

    def attempt(st: Setup) -> None:
        key = (st.compress_weight, st.compress_cache, st.cpu_cache_compute, st.int8)
        if id(st) in state["tried"] or any(k == key and b <= st.b and nb <= st.nb for k, b, nb in state["infeasible"]):
            return                                  # done, or a smaller block with these options did not fit
        state["tried"].add(id(st))
        if _surely_too_big(st):
            state["infeasible"].append((key, st.b, st.nb))
            return
        prob, p, info = placement_lp(st)
        state["solved"] += 1
        if _solve(prob) != "Optimal":
            state["infeasible"].append((key, st.b, st.nb))
            return
        policy = _policy_from(st, p, sep_layer)
        pred = predict(config, hardware, policy, prompt_len, gen_len, storage_bytes=storage_bytes, **_cap_kwargs(caps))
        if pred.fits and pred.tokens_per_s > state["rate"]:
            binding = tuple(c.name for c in prob.constraints() if not c.name.endswith("definition")
                            and not c.name.startswith("one_")
                            and abs(c.slack or 0.0) <= 1e-6 * max(1.0, abs(c.constant)))
            placement = {k: {t: info[k][t].value() for t in TIERS} for k in ("weight_frac", "cache_frac")}
            state["best"], state["rate"] = (pred, placement, binding), pred.tokens_per_s

    for _, st in candidates:                        # the smallest block of each option first: if it
        if st.b == 1 and st.nb == 1:                # does not fit, no block with that option does
            attempt(st)
    for bound, st in candidates:
        if bound <= state["rate"] * (1 + 1e-9):
            break                                   # no remaining shape can beat the best found
        attempt(st)
    best, solved = state["best"], state["solved"]
    if best is None:
        raise _shortfall_error(config, hardware, prompt_len, gen_len, caps, compress_weight, compress_cache,
                               storage_bytes, overlap, sep_layer)
    pred, placement, binding = best
    return PolicyChoice(pred.policy, pred.tokens_per_s, pred.prefill_s, pred.decode_s, pred.peaks, hardware,
                        pred.preflight, placement, binding, solved, time.perf_counter() - started)


def _cap_kwargs(caps: dict) -> dict:
    return {f"{t}_mem": caps[t] for t in TIERS}


def _powers(n: int) -> list[int]:
    return [1 << i for i in range(max(0, n).bit_length()) if 1 << i <= n]


def _shortfall_error(config, hw, s, gen, caps, cw, cc, storage_bytes, overlap, sep_layer) -> PolicySearchError:
    """Solve the smallest policy's program with elastic caps: which tiers are short, by how much."""
    precision = Precision(hw.compute_device, storage_dtype(storage_bytes), compress_weight=cw is not False,
                          compress_cache=cc is not False)
    st = make_setup(config, hw, prompt_len=s, gen_len=gen, gpu_batch_size=1, num_gpu_batches=1,
                    precision=precision, overlap=overlap, sep_layer=sep_layer, caps=caps)
    prob, _, info = placement_lp(st, elastic=True)
    _solve(prob)
    short = {t: int(math.ceil(v.value() or 0)) for t, v in info["short"].items() if (v.value() or 0) > 0.5}
    limits = dict(caps, ram=hw.ram_available)
    what = "; ".join(f"the {t} tier is short by {fmt_bytes(n)} (it has {fmt_bytes(limits[t])})" if t != "ram" else
                     f"RAM is short by {fmt_bytes(n)} ({fmt_bytes(limits[t])} available for the gpu and cpu tiers)"
                     for t, n in short.items()) or "the caps leave no room"
    smallest = (f"1 sequence per block{', 4-bit weights' if st.compress_weight else ''}"
                f"{', 4-bit KV cache' if st.compress_cache else ''}, prompt {s} + {gen} new tokens")
    hint = {"gpu": "raise --gpu-mem", "cpu": "raise --cpu-mem", "disk": "raise --disk-mem or free disk space "
            "(and pass --offload-dir)", "ram": "free RAM or lower the caps"}
    fixes = ", ".join(hint[t] for t in short) or "raise the caps"
    return PolicySearchError(f"no policy for {config.name} fits the memory caps: {what}, even for the "
                             f"smallest policy ({smallest}); {fixes}, or use shorter prompts", short)


def auto_choice(config: ModelConfig, tiers, storage: torch.dtype = torch.float16, prompt_len: int = 512,
                gen_len: int = 32, max_block_size: int = 64, int8_matmul: bool | None = False,
                compress_weight: bool | None = None, compress_cache: bool | None = None) -> PolicyChoice:
    """The searched policy and its predictions for this machine (cached probe) under the caps of `tiers`;
    `int8_matmul`, `compress_weight`, `compress_cache` as for search_policy."""
    hw = load_hardware()
    caps = {t: tiers.trackers[t].capacity - tiers.trackers[t].current for t in TIERS}
    caps["disk"] = min(caps["disk"], hw.disk_mem)
    if getattr(tiers, "offload_dir", None) is None:
        caps["disk"] = 0                              # no offload folder: nothing can live on disk
    prompt_len = max(1, min(prompt_len, config.max_positions - 1))
    gen_len = max(1, min(gen_len, config.max_positions - prompt_len))
    storage_bytes = storage.itemsize
    return search_policy(config, hw, prompt_len, gen_len, storage_bytes=storage_bytes,
                         max_block_size=max_block_size, int8_matmul=int8_matmul, compress_weight=compress_weight,
                         compress_cache=compress_cache, **_cap_kwargs(caps))


def auto_policy(config: ModelConfig, tiers, storage: torch.dtype = torch.float16, prompt_len: int = 512,
                gen_len: int = 32, max_block_size: int = 64, int8_matmul: bool | None = False,
                compress_weight: bool | None = None, compress_cache: bool | None = None) -> Policy:
    """The searched policy for this machine (cached probe) under the caps of `tiers`."""
    return auto_choice(config, tiers, storage, prompt_len, gen_len, max_block_size, int8_matmul,
                       compress_weight, compress_cache).policy
