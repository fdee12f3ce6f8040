"""Automatic policy: a cost model of one block of the schedule and a linear program that places it.

The cost model mirrors what `schedule.BlockRunner` does, layer slot by layer slot (embed, attn_i,
mlp_i, ..., head; the weights of the next layer are loaded while this one computes):

  main thread   compute of each micro-batch (matmuls at the measured rate for their row count,
                attention, elementwise passes, per-op overhead) and activation I/O when on disk;
  I/O thread    (FIFO) the next layer's weights, each micro-batch's KV cache load and store:
                disk reads/writes, storage -> compute conversion, 4-bit (de)quantization;
  CPU cores     on a CPU-only machine every conversion competes with compute for the same cores
                and memory bus, so only disk waits truly overlap: slot time >= compute + all
                CPU-side transfer work (measured: the two add up on 2 cores).

A slot takes the max of these (the sum with overlap off). Decode attention layers also wait for
the next layer's weights before their first cache load is served (FIFO order). Memory peaks
mirror the engine's trackers: weights homed per tier in that tier's format, the block's KV cache,
the hidden states, and on the compute device the buffer pool's working copies (two neighbouring
layers' weights, two micro-batches' cache); the engine's own pre-flight check
(`LLM._check_block_memory`) is a constraint too, so a chosen policy never fails it.

The program is exact about the engine's rounding: weights go to tiers tensor by tensor
(`weights.choose_tiers`: a tensor's midpoint against the percentages) and the cache by whole
sequences (`kv_cache.split_counts`), so the placement is chosen among the percentages where a
tensor or a sequence changes tier (binary selectors), and the fractions `weight_frac[tier]`,
`cache_frac[tier]` follow from them. An outer search enumerates `gpu_batch_size`,
`num_gpu_batches` and compression, pruned by an upper bound on throughput.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import pulp
import torch

from .compression import CompressionConfig, compressed_nbytes
from .config import ModelConfig
from .hardware import Hardware, load_hardware
from .kv_cache import split_counts
from .models import family as model_family
from .policy import Policy
from .tiers import ALIGN, MemoryBudgetError, fmt_bytes

TIERS = ("gpu", "cpu", "disk")
PROCESS_BASE_BYTES = 600 << 20       # torch + Python resident before any tensor (RAM check only)
# torch calls per (layer, micro-batch) on the main thread, including the schedule's own bookkeeping
MAIN_OPS = {"embed": 14, "attn": 12, "mlp": 12, "decoder": 16, "head": 16}   # (attn/mlp: the schedule's share)
OPS_PER_TENSOR_LOAD, OPS_PER_CACHE_PART, OPS_PER_CACHE_STORE = 5, 8, 14


class PolicySearchError(MemoryBudgetError):
    """No policy fits the memory caps; `shortfall` maps each short tier to the missing bytes."""

    def __init__(self, message: str, shortfall: dict[str, int]):
        super().__init__(message)
        self.shortfall = shortfall


@dataclass(frozen=True)
class Prediction:
    """The cost model's figures for one concrete policy."""
    policy: Policy
    tokens_per_s: float
    prefill_s: float
    decode_s: float
    peaks: dict                      # tier -> bytes the engine's trackers will peak at
    preflight: dict                  # tier -> bytes the engine's pre-flight check will ask for
    fits: bool                       # weights + pre-flight fit every cap
    breakdown: dict = field(default_factory=dict)   # (phase, slot) -> seconds per step


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


# ---- the model's shape as the engine places it ------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    elems: int
    mid: float               # midpoint of its bytes within its layer, in percent (choose_tiers' rule)
    nbytes: tuple            # bytes held on (gpu, cpu, disk) in that tier's format
    quantized: bool
    shape: tuple             # the engine's buffer pool reuses working copies by shape


@dataclass(frozen=True)
class _Kind:
    name: str                # embed | attn | mlp | decoder | head
    tensors: tuple

    def at_or_below(self, g: float, what) -> float:
        """Sum of what(tensor) over tensors homed on a tier whose cumulative percentage is g."""
        return sum(what(t) for t in self.tensors if t.mid < g)


@dataclass(frozen=True)
class _Setup:
    """Everything about one candidate that does not depend on the placement."""
    cfg: ModelConfig
    hw: Hardware
    s: int                   # prompt length
    gen: int                 # generated tokens
    b: int                   # gpu_batch_size
    nb: int                  # num_gpu_batches
    compress_weight: bool
    compress_cache: bool
    cpu_cache_compute: bool
    overlap: bool
    storage_bytes: int
    kinds: dict              # name -> _Kind
    plan: tuple              # kind names in schedule order
    caps: dict               # tier -> bytes
    cache_config: CompressionConfig = Policy().comp_cache_config

    @property
    def cuda(self) -> bool:
        return self.hw.compute_device == "cuda"

    @property
    def itemsize(self) -> int:
        return 2 if self.cuda else 4

    @property
    def max_len(self) -> int:
        return self.s + self.gen

    @property
    def counts(self) -> dict:
        """kind -> how many layers of that kind the schedule runs per step."""
        return {k: self.plan.count(k) for k in self.kinds}

    @property
    def slots(self) -> dict:
        """(kind, next kind) -> how many times that pair occurs per step (the plan wraps around)."""
        out = {}
        for j, k in enumerate(self.plan):
            pair = (k, self.plan[(j + 1) % len(self.plan)])
            out[pair] = out.get(pair, 0) + 1
        return out


def _kinds(cfg: ModelConfig, hw: Hardware, compress_weight: bool, storage_bytes: int, sep_layer: bool,
           wcfg: CompressionConfig) -> tuple[dict, tuple]:
    """Each layer kind's tensors as the engine places them, and the schedule's sequence of kinds."""
    fam = model_family(cfg.family)
    itemsize = 2 if hw.compute_device == "cuda" else 4

    def specs(kind):
        if kind != "decoder":
            return fam.layer_weights(cfg, kind)
        return fam.layer_weights(cfg, "attn") + fam.layer_weights(cfg, "mlp")

    kinds = {}
    for kind in ("embed", "attn", "mlp", "head") if sep_layer else ("embed", "decoder", "head"):
        shapes = [tuple(s.shape) for s in specs(kind)]
        sizes = [math.prod(sh) for sh in shapes]
        total, done, tensors = max(1, sum(sizes)), 0, []
        for shape, n in zip(shapes, sizes):
            q = compress_weight and len(shape) >= 2
            stored = compressed_nbytes(shape, wcfg) if q else n * storage_bytes
            on_gpu = compressed_nbytes(shape, wcfg) if q else n * itemsize
            tensors.append(_Tensor(n, (done + n / 2) / total * 100, (on_gpu, stored, _align(stored)), q, shape))
            done += n
        kinds[kind] = _Kind(kind, tuple(tensors))
    middle = ("attn", "mlp") if sep_layer else ("decoder",)
    return kinds, ("embed",) + middle * cfg.num_layers + ("head",)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _thresholds(kinds: dict) -> list[float]:
    """The cumulative percentages that give every distinct tensor placement: 0, a round number
    between each pair of neighbouring tensor midpoints, 100."""
    mids = sorted({round(t.mid, 9) for k in kinds.values() for t in k.tensors})
    return [0.0] + [_round_between(lo, hi) for lo, hi in zip(mids, mids[1:])] + [100.0]


def _round_between(lo: float, hi: float) -> float:
    """The roundest number strictly between lo and hi (fewest decimals, then nearest the middle)."""
    mid = (lo + hi) / 2
    for decimals in range(0, 7):
        step = 10.0 ** -decimals
        first, last = math.floor(lo / step) + 1, math.ceil(hi / step) - 1
        if first <= last:
            best = min(range(first, last + 1), key=lambda k: abs(k * step - mid))
            return round(best * step, decimals)
    return mid


# ---- linear expressions that work for floats and for pulp selectors ------------------------------
def _dot(sel, values) -> object:
    """sum(coef * value) over a selector [(key, coef)] and values[key]; floats or a pulp expression."""
    terms = [(c, values(k)) for k, c in sel]
    if any(isinstance(c, pulp.LpVariable) for c, _ in terms):
        return pulp.lpSum(c * v for c, v in terms if v)
    return sum(c * v for c, v in terms)


@dataclass
class _Placement:
    """Selectors: weights by cumulative-percentage thresholds, cache by sequence counts, act by tier.

    Each selector is [(key, coef)]: one entry with coef 1.0 for a concrete policy, or every possible
    key with a binary variable as coef inside the program, so one cost model serves both.
    """
    b: int
    w_gpu: list              # tensors whose midpoint < threshold are on gpu
    w_gpu_cpu: list          # ... on gpu or cpu (the rest on disk)
    c_gpu: list              # sequences of each micro-batch on gpu
    c_gpu_cpu: list          # ... on gpu or cpu (the rest on disk)
    act: dict                # tier -> coef
    memo: dict = field(default_factory=dict)

    def weights(self, kind: _Kind, key: str, what) -> dict:
        """tier -> sum of what(tensor, tier) over the kind's tensors homed on that tier (memoized by key)."""
        if (kind.name, key) not in self.memo:
            self.memo[(kind.name, key)] = self._weights(kind, what)
        return self.memo[(kind.name, key)]

    def cache(self, key: str, fn) -> dict:
        """tier -> fn(tier, sequences there); exact for gpu and disk, fn must be linear in n for cpu."""
        if key not in self.memo:
            self.memo[key] = {
                "gpu": _dot(self.c_gpu, lambda n: fn("gpu", n)),
                "cpu": _dot(self.c_gpu_cpu, lambda n: fn("cpu", n)) - _dot(self.c_gpu, lambda n: fn("cpu", n)),
                "disk": _dot(self.c_gpu_cpu, lambda n: fn("disk", self.b - n))}
        return self.memo[key]

    def _weights(self, kind: _Kind, what) -> dict:
        below = lambda tier: (lambda g: kind.at_or_below(g, lambda x: what(x, tier)))
        every = lambda tier: sum(what(x, tier) for x in kind.tensors)
        return {"gpu": _dot(self.w_gpu, below("gpu")),
                "cpu": _dot(self.w_gpu_cpu, below("cpu")) - _dot(self.w_gpu, below("cpu")),
                "disk": _dot(self.w_gpu_cpu, lambda g: every("disk") - below("disk")(g))}


def _const_placement(policy: Policy) -> _Placement:
    g, c, _ = policy.percents("w")
    n_g, n_c, _ = split_counts(policy.gpu_batch_size, policy.percents("cache"))
    return _Placement(policy.gpu_batch_size, [(g, 1.0)], [(g + c, 1.0)], [(n_g, 1.0)], [(n_g + n_c, 1.0)],
                      {t: float(t == policy.act_tier) for t in TIERS})


# ---- the cost model ----------------------------------------------------------------------------------
def _cache_row_bytes(st: _Setup, tier: str, n: int) -> int:
    """Bytes of one cache row (one position) of n sequences on a tier, as kv_cache.cache_format holds it."""
    if n <= 0:
        return 0
    shape = (2, n, st.cfg.num_kv_heads, st.cfg.head_dim)
    if st.compress_cache:
        raw = compressed_nbytes(shape, st.cache_config)
    else:
        raw = math.prod(shape) * (st.itemsize if tier == "gpu" else st.storage_bytes)
    return _align(raw) if tier == "disk" else raw


def _compute_mb(st: _Setup, kind: str, phase: str, t: float) -> float:
    """Main-thread seconds of one micro-batch through one layer (matmuls, attention, elementwise, overhead)."""
    cfg, hw, b = st.cfg, st.hw, st.b
    h, f, kv, e = cfg.hidden_size, cfg.ffn_dim, cfg.kv_dim, cfg.word_embed_proj_dim
    rows = b * (st.s if phase == "prefill" else 1)
    mm = lambda flops, m: flops / hw.matmul_rate(m)
    ew = lambda elems: elems * st.itemsize * 3 / hw.memcpy_bytes_per_s       # read twice, write once
    sec = MAIN_OPS[kind] * hw.op_overhead_s
    sec += hw.attn_layer_overhead_s if kind in ("attn", "decoder") else 0.0    # the layer's own ops, measured
    sec += hw.mlp_layer_overhead_s if kind in ("mlp", "decoder") else 0.0
    if kind in ("attn", "decoder"):
        sec += mm(2 * rows * h * (2 * h + 2 * kv), rows) + ew(rows * 6 * h)
        if phase == "prefill":
            sec += 4 * b * st.s * st.s * h / hw.attn_prefill_flops
        else:   # concat of the past keys/values with the new ones, then attend
            sec += 2 * b * (t + 1) * kv * 4 / hw.attn_decode_bytes_per_s
    if kind in ("mlp", "decoder"):
        mats = 3 if cfg.family == "llama" else 2
        sec += mm(2 * rows * h * f * mats, rows) + ew(rows * (4 * h + 2 * f))
    if kind == "embed":
        sec += ew(rows * 3 * h) + (mm(2 * rows * h * e, rows) if e != h else 0.0)
    if kind == "head":      # the last position only, then sampling
        sec += mm(2 * b * e * cfg.vocab_size, b) + ew(b * cfg.vocab_size) + b * hw.op_overhead_s
    return sec


def _rate(st: _Setup, name: str) -> float:
    """A transfer rate as the thread doing it sees it: the I/O thread (one torch thread) with overlap,
    else the main thread."""
    return getattr(st.hw, f"io_{name}" if st.overlap else name)


def _widen(st: _Setup, elems, quantized: bool = False):
    """Seconds to make stored (not device-resident) elements compute-ready."""
    hw = st.hw
    if quantized:
        return elems / _rate(st, "dequant_elems_per_s")
    if st.cuda:
        return elems * st.storage_bytes / hw.h2d_bytes_per_s
    return 0.0 if st.storage_bytes == st.itemsize else elems / _rate(st, "convert_elems_per_s")


def _weight_load(st: _Setup, p: _Placement, kind: _Kind) -> tuple:
    """(I/O-thread seconds, of which CPU work) to make one layer's weights compute-ready."""
    hw = st.hw
    plain = p.weights(kind, "plain_elems", lambda x, tier: 0 if x.quantized else x.elems)
    quant = p.weights(kind, "quantized_elems", lambda x, tier: x.elems if x.quantized else 0)
    disk = p.weights(kind, "disk_bytes", lambda x, tier: x.nbytes[2])["disk"]
    n_disk = p.weights(kind, "tensors", lambda x, tier: 1)["disk"]
    cpu_work = (_widen(st, plain["cpu"] + plain["disk"]) + _widen(st, quant["gpu"] + quant["cpu"] + quant["disk"], True)
                + len(kind.tensors) * OPS_PER_TENSOR_LOAD * hw.op_overhead_s)
    disk_wait = disk / hw.disk_read_bytes_per_s + n_disk * hw.disk_read_latency_s
    return cpu_work + disk_wait, cpu_work


def _cache_load(st: _Setup, p: _Placement, t: float) -> tuple:
    """(I/O-thread seconds, of which CPU work) to load one micro-batch's past keys/values of one layer."""
    hw, per_seq = st.hw, 2 * st.cfg.kv_dim * t
    seqs = p.cache("sequences", lambda tier, n: n)
    away = seqs["cpu"] + seqs["disk"]
    if st.compress_cache:
        cpu_work = st.b * per_seq / _rate(st, "cache_dequant_elems_per_s")
    elif st.cuda and st.cpu_cache_compute:       # widened on the CPU and attended there: no copy to the device
        cpu_work = away * per_seq / _rate(st, "convert_elems_per_s")
    else:
        cpu_work = _widen(st, away * per_seq)
    disk_rows = p.cache("row_bytes", lambda tier, n: _cache_row_bytes(st, tier, n))["disk"]
    disk_reads = p.cache("parts", lambda tier, n: 1 if n > 0 and tier != "cpu" else 0)["disk"]
    cpu_work += 3 * OPS_PER_CACHE_PART * hw.op_overhead_s
    disk_wait = disk_rows * t / hw.disk_read_bytes_per_s + disk_reads * hw.disk_read_latency_s
    return cpu_work + disk_wait, cpu_work


def _cache_store(st: _Setup, p: _Placement, phase: str) -> tuple:
    """(I/O-thread seconds, of which CPU work) to store one micro-batch's new keys/values of one layer."""
    hw, q = st.hw, (st.s if phase == "prefill" else 1)
    elems = 2 * st.b * q * st.cfg.kv_dim
    on_gpu = p.cache("sequences", lambda tier, n: n)["gpu"] / st.b
    if st.compress_cache:
        cpu_work = elems / _rate(st, "quant_elems_per_s")
    else:   # rounded through the storage dtype; on a CPU compute device the gpu tier widens it back
        cpu_work = (elems / _rate(st, "narrow_elems_per_s")
                    + (0 if st.cuda else elems * on_gpu / _rate(st, "convert_elems_per_s")))
    cpu_work += elems * st.itemsize * 3 / _rate(st, "memcpy_bytes_per_s") + OPS_PER_CACHE_STORE * hw.op_overhead_s
    disk_rows = p.cache("row_bytes", lambda tier, n: _cache_row_bytes(st, tier, n))["disk"]
    disk_writes = p.cache("parts", lambda tier, n: 1 if n > 0 and tier != "cpu" else 0)["disk"]
    disk_wait = disk_rows * q / hw.disk_write_bytes_per_s + disk_writes * hw.disk_write_latency_s
    return cpu_work + disk_wait, cpu_work


def _act_io(st: _Setup, p: _Placement, phase: str):
    """Main-thread seconds per micro-batch and layer to put and get hidden states on their tier."""
    hw = st.hw
    nbytes = st.b * (st.s if phase == "prefill" else 1) * st.cfg.hidden_size * 4   # held as float32 on disk
    disk = (_align(nbytes) / hw.disk_write_bytes_per_s + nbytes / hw.disk_read_bytes_per_s
            + hw.disk_write_latency_s + hw.disk_read_latency_s + 40 * hw.op_overhead_s)
    cpu = nbytes / hw.d2h_bytes_per_s + nbytes / hw.h2d_bytes_per_s if st.cuda else 0.0
    return p.act["disk"] * disk + p.act["cpu"] * cpu


def _slot_bounds(st: _Setup, p: _Placement, kind: str, nxt: str, phase: str) -> dict:
    """Named lower bounds on one slot's time: this layer's work plus the next layer's weight load."""
    t = st.s + max(0, st.gen - 2) / 2                       # mean cache length over the decode steps
    cache_layer = kind in ("attn", "decoder")
    compute = _compute_mb(st, kind, phase, t)
    w_all, w_cpu = _weight_load(st, p, st.kinds[nxt])
    c_all, c_cpu = _cache_load(st, p, t) if cache_layer and phase == "decode" else (0.0, 0.0)
    s_all, s_cpu = _cache_store(st, p, phase) if cache_layer else (0.0, 0.0)
    main = st.nb * compute + st.nb * _act_io(st, p, phase)
    io = w_all + st.nb * (c_all + s_all)
    if not st.overlap:
        return {"serial": main + io}
    bounds = {"main_thread": main, "io_thread": io}
    if cache_layer and phase == "decode":   # FIFO: the first cache load queues behind the weight prefetch
        bounds["first_cache_after_weights"] = w_all + c_all + main
    if not st.cuda:   # the I/O thread's conversions and compute share the cores and the memory bus:
        # measured on 2 cores, they add up (compute slows by about what the conversions take)
        bounds["cpu_cores"] = main + w_cpu + st.nb * (c_cpu + s_cpu)
    return bounds


# ---- memory ----------------------------------------------------------------------------------------
def _working(st: _Setup, p: _Placement, kind: _Kind):
    """Bytes LayerWeights.working_bytes allocates on the compute device for one layer."""
    on = p.weights(kind, "working", lambda x, tier: x.elems * st.itemsize if tier != "gpu" or x.quantized else 0)
    return on["gpu"] + on["cpu"] + on["disk"]


def _memory(st: _Setup, p: _Placement) -> dict:
    """Named byte expressions: what each tier holds, and the engine's working copies and pre-flight terms."""
    cfg, b, nb = st.cfg, st.b, st.nb
    weights = {t: 0 for t in TIERS}
    for name, count in st.counts.items():
        on = p.weights(st.kinds[name], "held_bytes", lambda x, tier: x.nbytes[TIERS.index(tier)])
        weights = {t: weights[t] + count * on[t] for t in TIERS}
    rows = p.cache("row_bytes", lambda tier, n: _cache_row_bytes(st, tier, n))
    hidden = lambda q, tier: b * q * cfg.hidden_size * (4 if tier == "disk" else st.itemsize)
    working = {name: _working(st, p, st.kinds[name]) for name in st.kinds}
    # sequences whose cache is loaded into pool buffers (all of them when 4-bit)
    copied = b if st.compress_cache else b - p.cache("sequences", lambda tier, n: n)["gpu"]
    shapes = {x.shape for k in st.kinds.values() for x in k.tensors}
    pooled = {}   # shape -> kind -> working copies of that shape one layer of the kind borrows
    for shape in shapes:
        for name, kind in st.kinds.items():
            on = p.weights(kind, f"borrowed_{shape}", lambda x, tier: 1 if x.shape == shape and (
                tier != "gpu" or x.quantized) else 0)
            pooled.setdefault(shape, {})[name] = on["gpu"] + on["cpu"] + on["disk"]
    return {
        "weights": weights,
        "cache": {t: rows[t] * st.max_len * cfg.num_layers * nb for t in TIERS},
        "act_prefill": {t: p.act[t] * nb * (_align(hidden(st.s, t)) if t == "disk" else hidden(st.s, t))
                        for t in TIERS},
        "act_decode": {t: p.act[t] * nb * (_align(hidden(1, t)) if t == "disk" else hidden(1, t)) for t in TIERS},
        "working_each": working,
        "pool_counts": pooled,
        "cache_copies": min(2, nb) * copied * 2 * cfg.kv_dim * st.max_len * st.itemsize,   # full-length buffers
        "preflight_act": {t: p.act[t] * nb * b * st.s * cfg.hidden_size * st.itemsize for t in TIERS},
        "preflight_cache_copies": 4 * b * st.max_len * cfg.kv_dim * st.itemsize,
        "transient": b * st.s * (cfg.ffn_dim + 6 * cfg.hidden_size) * st.itemsize + b * st.s * st.s * st.itemsize,
    }


def _weight_elems(st: _Setup) -> int:
    return sum(t.elems for name in st.plan for t in st.kinds[name].tensors)


# ---- one concrete policy ---------------------------------------------------------------------------
def predict(config: ModelConfig, hardware: Hardware, policy: Policy, prompt_len: int, gen_len: int, *,
            storage_bytes: int = 2, gpu_mem=None, cpu_mem=None, disk_mem=None) -> Prediction:
    """The cost model's throughput, times and peaks for `policy` on this hardware and workload."""
    st = _setup(config, hardware, prompt_len, gen_len, policy.gpu_batch_size, policy.num_gpu_batches,
                policy.compress_weight, policy.compress_cache, policy.cpu_cache_compute, policy.overlap,
                storage_bytes, policy.sep_layer, _caps(hardware, gpu_mem, cpu_mem, disk_mem),
                policy.comp_weight_config, policy.comp_cache_config)
    p = _const_placement(policy)
    breakdown, prefill, step = {}, 0.0, 0.0
    for (kind, nxt), count in st.slots.items():
        for phase in ("prefill", "decode"):
            sec = max(_slot_bounds(st, p, kind, nxt, phase).values())
            breakdown[(phase, f"{kind}->{nxt}")] = sec * count
            if phase == "prefill":
                prefill += sec * count
            else:
                step += sec * count
    decode = step * max(0, gen_len - 1)
    m = _memory(st, p)
    peaks, preflight = _peaks(st, m, max)
    fits = all(preflight[t] <= st.caps[t] and m["weights"][t] <= st.caps[t] for t in TIERS)
    tokens = policy.block_size * gen_len
    return Prediction(policy, tokens / (prefill + decode), prefill, decode, peaks, preflight, fits, breakdown)


def _peaks(st: _Setup, m: dict, biggest) -> tuple[dict, dict]:
    """(tracker peaks, pre-flight need including weights) per tier, for a concrete placement.

    On the compute device the engine's buffer pool keeps, for every tensor shape, as many working
    copies as two neighbouring layers ever borrow at once (all of them when the next layer loads
    before this one is done, as without overlap; fewer when the I/O thread runs late, so with overlap
    this is an upper bound), and trims idle ones when the budget is hit."""
    itemsize = st.itemsize
    pooled = sum(math.prod(shape) * itemsize * max(counts[a] + counts[c] for a, c in st.slots)
                 for shape, counts in m["pool_counts"].items())
    peaks = {}
    for t in TIERS:
        base = m["weights"][t] + m["cache"][t]
        pre = base + m["act_prefill"][t] + (pooled if t == "gpu" else 0)
        dec = base + m["act_decode"][t] + (pooled + m["cache_copies"] if t == "gpu" else 0)
        peaks[t] = max(pre, dec)
    peaks["gpu"] = min(peaks["gpu"], st.caps["gpu"])
    preflight = {t: m["weights"][t] + m["cache"][t] + m["preflight_act"][t] for t in TIERS}
    preflight["gpu"] += 2 * biggest(m["working_each"].values()) + m["preflight_cache_copies"]
    return peaks, preflight


# ---- the program -----------------------------------------------------------------------------------
def _name(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m")


def placement_lp(st: _Setup, elastic: bool = False) -> tuple[pulp.LpProblem, _Placement, dict]:
    """The placement program for one candidate batch shape: minimise the block's seconds.

    Variables: binary selectors of the weight thresholds, cache sequence counts and activation
    tier; `weight_frac_<tier>` and `cache_frac_<tier>` (shares that follow from them); one time per
    (phase, layer slot). With `elastic`, `short_<tier>` bytes may be added to each cap (at a cost
    dominating everything else): the optimum then says which tier is short and by how much.
    """
    prob = pulp.LpProblem(f"placement_b{st.b}_nb{st.nb}", pulp.LpMinimize)
    binary = lambda name: prob.add_variable(name, 0, 1, cat=pulp.LpBinary)
    g_vals = _thresholds(st.kinds)
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
    p = _Placement(st.b, w_gpu, w_gc, c_gpu, c_gc, act)

    total = _weight_elems(st)
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
            for bound, expr in _slot_bounds(st, p, kind, nxt, phase).items():
                prob += var >= expr, f"{phase}_{kind}_to_{nxt}_{bound}"
    prefill = pulp.lpSum(count * v for (ph, _, _), (v, count) in seconds.items() if ph == "prefill")
    step = pulp.lpSum(count * v for (ph, _, _), (v, count) in seconds.items() if ph == "decode")
    block_seconds = prefill + max(0, st.gen - 1) * step

    m = _memory(st, p)
    short = {t: prob.add_variable(f"short_{t}", 0) if elastic else 0 for t in (*TIERS, "ram")}
    # the buffer pool keeps per tensor shape as many working copies as two neighbouring layers borrow;
    # counting them against the cap keeps the pool from trimming and re-faulting buffers every layer
    pooled = 0
    for shape, counts in m["pool_counts"].items():
        label = "x".join(map(str, shape))
        copies = prob.add_variable(f"gpu_pool_copies_{label}", 0)
        for a, c in st.slots:
            prob += copies >= counts[a] + counts[c], f"gpu_pool_copies_{label}_{a}_then_{c}"
        pooled += math.prod(shape) * st.itemsize * copies
    work_max = prob.add_variable("gpu_largest_layer_working_copy", 0)
    for k, expr in m["working_each"].items():
        prob += work_max >= expr, f"gpu_working_copy_{k}"
    peak = {}
    for t in TIERS:
        base = m["weights"][t] + m["cache"][t]
        peak[("prefill", t)] = base + m["act_prefill"][t] + (pooled if t == "gpu" else 0)
        peak[("decode", t)] = base + m["act_decode"][t] + (pooled + m["cache_copies"] if t == "gpu" else 0)
        for phase in ("prefill", "decode"):
            prob += peak[(phase, t)] <= st.caps[t] + short[t], f"{t}_peak_{phase}"
        pre = base + m["preflight_act"][t] + (2 * work_max + m["preflight_cache_copies"] if t == "gpu" else 0)
        prob += pre <= st.caps[t] + short[t], f"{t}_engine_preflight"
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


def _policy_from(st: _Setup, p: _Placement, sep_layer: bool) -> Policy:
    g, gc = _chosen(p.w_gpu), _chosen(p.w_gpu_cpu)
    n_g, n_gc = _chosen(p.c_gpu), _chosen(p.c_gpu_cpu)
    act = next(t for t, z in p.act.items() if (z.value() or 0) > 0.5)
    return Policy(gpu_batch_size=st.b, num_gpu_batches=st.nb, w_gpu_percent=g, w_cpu_percent=round(gc - g, 6),
                  cache_gpu_percent=100 * n_g / st.b, cache_cpu_percent=100 * (n_gc - n_g) / st.b,
                  act_gpu_percent=100.0 if act == "gpu" else 0.0, act_cpu_percent=100.0 if act == "cpu" else 0.0,
                  overlap=st.overlap, sep_layer=sep_layer, cpu_cache_compute=st.cpu_cache_compute,
                  compress_weight=st.compress_weight, compress_cache=st.compress_cache)


# ---- the search ------------------------------------------------------------------------------------
def _caps(hw: Hardware, gpu_mem, cpu_mem, disk_mem) -> dict:
    from .tiers import parse_bytes
    caps = {"gpu": hw.gpu_mem, "cpu": hw.cpu_mem, "disk": hw.disk_mem}
    for t, v in (("gpu", gpu_mem), ("cpu", cpu_mem), ("disk", disk_mem)):
        if v is not None:
            caps[t] = parse_bytes(v)
    return caps


def _setup(cfg, hw, s, gen, b, nb, cw, cc, ccc, overlap, storage_bytes, sep_layer, caps,
           wcfg: CompressionConfig = Policy().comp_weight_config,
           ccfg: CompressionConfig = Policy().comp_cache_config) -> _Setup:
    kinds, plan = _kinds(cfg, hw, cw, storage_bytes, sep_layer, wcfg)
    return _Setup(cfg, hw, s, gen, b, nb, cw, cc, ccc, overlap, storage_bytes, kinds, plan, caps, ccfg)


def _lower_bound_seconds(st: _Setup) -> float:
    """Seconds per block that no placement can beat, for pruning: per step, the compute; the disk
    reads of the weights that cannot fit the gpu and cpu caps; on CPU, compute plus converting
    every weight not on the gpu tier (and dequantizing every 4-bit one)."""
    hw, t = st.hw, st.s + max(0, st.gen - 2) / 2
    tensors = [(x, st.counts[k]) for k, kind in st.kinds.items() for x in kind.tensors]
    elems = sum(x.elems * n for x, n in tensors)
    quant = sum(x.elems * n for x, n in tensors if x.quantized)
    min_bytes = min(x.nbytes[1] / x.elems for x, _ in tensors)             # cheapest bytes per element
    room = st.caps["gpu"] + st.caps["cpu"] if st.cuda else min(st.caps["gpu"] + st.caps["cpu"], st.hw.ram_available)
    disk_read = max(0.0, elems - room / min_bytes) * min_bytes / hw.disk_read_bytes_per_s
    widen = 0.0
    if not st.cuda:
        widen = quant / _rate(st, "dequant_elems_per_s")
        if not st.compress_weight and st.storage_bytes != st.itemsize:
            widen += max(0.0, elems - st.caps["gpu"] / st.itemsize) / _rate(st, "convert_elems_per_s")
    total = 0.0
    for phase, steps in (("prefill", 1), ("decode", max(0, st.gen - 1))):
        compute = sum(count * st.nb * _compute_mb(st, kind, phase, t) for (kind, _), count in st.slots.items())
        work = widen
        if st.compress_cache and not st.cuda:          # every cache row is (de)quantized wherever it lives
            rows = 2 * st.cfg.kv_dim * st.b * st.nb * st.cfg.num_layers
            work += rows * (st.s if phase == "prefill" else 1) / _rate(st, "quant_elems_per_s")
            work += rows * t / _rate(st, "cache_dequant_elems_per_s") if phase == "decode" else 0.0
        if st.overlap:
            step = max(compute, disk_read + work, compute + (0.0 if st.cuda else work))
        else:
            step = compute + disk_read + work
        total += steps * step
    return total


def _surely_too_big(st: _Setup) -> bool:
    """Placement-independent memory needs that already exceed the caps (a quick filter before the program)."""
    cfg = st.cfg
    copies = 4 * st.b * st.max_len * cfg.kv_dim * st.itemsize           # the engine's pre-flight reserve
    transient = st.b * st.s * (cfg.ffn_dim + 6 * cfg.hidden_size + st.s) * st.itemsize
    weights = sum(min(x.nbytes) * st.counts[k] for k, kind in st.kinds.items() for x in kind.tensors)
    row = min(_cache_row_bytes(st, "cpu", st.b), _cache_row_bytes(st, "gpu", st.b))
    cache = row * st.max_len * cfg.num_layers * st.nb
    total = st.caps["gpu"] + st.caps["cpu"] + st.caps["disk"]
    ram = not st.cuda and copies + transient + PROCESS_BASE_BYTES > st.hw.ram_available
    return copies > st.caps["gpu"] or weights + cache + copies > total or ram


def search_policy(config: ModelConfig, hardware: Hardware, prompt_len: int, gen_len: int, *,
                  gpu_mem=None, cpu_mem=None, disk_mem=None, compress_weight: bool | None = None,
                  compress_cache: bool | None = None, storage_bytes: int = 2, max_block_size: int = 64,
                  overlap: bool = True, sep_layer: bool = True) -> PolicyChoice:
    """The fastest policy (by the cost model) that fits the caps, with its predicted figures.

    Caps default to the hardware's capacities. `compress_weight`/`compress_cache` None lets the
    search decide; True/False forces. Raises PolicySearchError (a MemoryBudgetError) naming the
    tier that is short, and by how much, when even the smallest policy does not fit.
    """
    started = time.perf_counter()
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len ({prompt_len}) and gen_len ({gen_len}) must be at least 1")
    if prompt_len + gen_len > config.max_positions:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s context "
                         f"window of {config.max_positions}")
    caps = _caps(hardware, gpu_mem, cpu_mem, disk_mem)
    cuda = hardware.compute_device == "cuda"
    options = lambda forced: (forced,) if forced is not None else (False, True)
    shapes = [(b, nb) for b in _powers(max_block_size) for nb in _powers(max_block_size // b)]
    candidates = []
    for cw in options(compress_weight):
        for cc in options(compress_cache):
            for ccc in ((False, True) if cuda else (False,)):
                for b, nb in shapes:
                    st = _setup(config, hardware, prompt_len, gen_len, b, nb, cw, cc, ccc, overlap,
                                storage_bytes, sep_layer, caps)
                    candidates.append((b * nb * gen_len / _lower_bound_seconds(st), st))
    candidates.sort(key=lambda c: -c[0])
    state = {"best": None, "rate": 0.0, "solved": 0, "infeasible": [], "tried": set()}

    def attempt(st: _Setup) -> None:
        key = (st.compress_weight, st.compress_cache, st.cpu_cache_compute)
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
    st = _setup(config, hw, s, gen, 1, 1, cw is not False, cc is not False, False, overlap,
                storage_bytes, sep_layer, caps)
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
                gen_len: int = 32, max_block_size: int = 64) -> PolicyChoice:
    """The searched policy and its predictions for this machine (cached probe) under the caps of `tiers`."""
    hw = load_hardware()
    caps = {t: tiers.trackers[t].capacity - tiers.trackers[t].current for t in TIERS}
    caps["disk"] = min(caps["disk"], hw.disk_mem)
    if getattr(tiers, "offload_dir", None) is None:
        caps["disk"] = 0                              # no offload folder: nothing can live on disk
    prompt_len = max(1, min(prompt_len, config.max_positions - 1))
    gen_len = max(1, min(gen_len, config.max_positions - prompt_len))
    storage_bytes = torch.empty((), dtype=storage).element_size()
    return search_policy(config, hw, prompt_len, gen_len, storage_bytes=storage_bytes,
                         max_block_size=max_block_size, **_cap_kwargs(caps))


def auto_policy(config: ModelConfig, tiers, storage: torch.dtype = torch.float16, prompt_len: int = 512,
                gen_len: int = 32, max_block_size: int = 64) -> Policy:
    """The searched policy for this machine (cached probe) under the caps of `tiers`."""
    return auto_choice(config, tiers, storage, prompt_len, gen_len, max_block_size).policy
