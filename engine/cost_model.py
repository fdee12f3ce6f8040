"""The cost model of one block of the schedule: seconds per layer slot and bytes per tier.

It mirrors what `schedule.BlockRunner` does, layer slot by layer slot (embed, attn_i, mlp_i, ...,
head; the weights of the next layer are loaded while this one computes):

  main thread   compute of each micro-batch (matmuls at the measured rate for their row count,
                attention, elementwise passes, per-op overhead) and activation I/O when on disk;
  I/O threads   one loads the next layer's weights, one (FIFO) each micro-batch's KV cache and
                stores its new entries: disk reads/writes, storage -> compute conversion, 4-bit
                (de)quantization; the disk they share is a bound of its own;
  CPU cores     on a CPU-only machine every conversion competes with compute for the same cores
                and memory bus, so only disk waits truly overlap: slot time >= compute + all
                CPU-side transfer work (measured: the two add up on 2 cores).

A slot takes the max of these (the sum with overlap off). Decode attention layers also wait for
their first micro-batch's cache load, which starts with the layer. Memory peaks
mirror the engine's trackers: weights homed per tier in that tier's format, the block's KV cache,
the hidden states, and on the compute device the buffer pool's working copies (two neighbouring
layers' weights, two micro-batches' cache); the engine's own pre-flight check
(`LLM._check_block_memory`) is a term too, so a chosen policy never fails it.

Every expression is written once over `Placement` selectors, so it evaluates to a float for a
concrete policy (`predict`) and to a pulp expression inside the program (`engine.policy_search`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pulp

from . import int8 as int8_format
from .compression import CompressionConfig, compressed_nbytes, multiply_packed, padded_shape, scratch_elems
from .accounting import parse_bytes
from .config import ModelConfig
from .hardware import Hardware
from .kv_cache import split_counts
from .models import LOOKUP_TABLES, family as model_family
from .policy import TIERS, Policy
from .disk import aligned
from .formats import compute_dtype

PROCESS_BASE_BYTES = 600 << 20       # torch + Python resident before any tensor (RAM check only)
# torch calls per (layer, micro-batch) on the main thread, including the schedule's own bookkeeping
MAIN_OPS = {"embed": 14, "attn": 12, "mlp": 12, "decoder": 16, "head": 16}   # (attn/mlp: the schedule's share)
OPS_PER_TENSOR_LOAD, OPS_PER_CACHE_PART, OPS_PER_CACHE_STORE = 5, 8, 14


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
    pool_bytes: dict = field(default_factory=dict)  # phase -> bytes the buffer pool holds (gpu tier)
    breakdown: dict = field(default_factory=dict)   # (phase, slot) -> seconds per step


# ---- the model's shape as the engine places it ------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    elems: int
    mid: float               # midpoint of its bytes within its layer, in percent (choose_tiers' rule)
    nbytes: tuple            # bytes held on (gpu, cpu, disk) in that tier's format
    quantized: bool
    shape: tuple             # its working copy's shape (4-bit: whole groups); the pool reuses copies by shape
    work_bytes: int          # bytes of that working copy
    lookup: bool = False     # a quantized table `embed` gathers rows from: loaded still packed
    tied: bool = False       # the checkpoint tensor of an earlier kind (a tied LM head): held there, not again
    scratch: tuple = ()      # the buffer borrowed instead when a step multiplies it packed (() = shape)
    scratch_bytes: int = 0
    int8: bool = False       # held as int8 rows (Policy.int8_matmul): multiplied as stored, never widened
    requant: bool = False    # held 4-bit, made int8 rows in its working copy at each load (weights.requantized)

    def borrowed(self, packed: bool) -> tuple[tuple, int]:
        """(shape, bytes) of the pool buffer LayerWeights.load borrows for it (weights.borrow_shape)."""
        return (self.scratch, self.scratch_bytes) if packed and self.scratch else (self.shape, self.work_bytes)


@dataclass(frozen=True)
class _Kind:
    name: str                # embed | attn | mlp | decoder | head
    tensors: tuple

    def at_or_below(self, g: float, what) -> float:
        """Sum of what(tensor) over tensors homed on a tier whose cumulative percentage is g."""
        return sum(what(t) for t in self.tensors if t.mid < g)


@dataclass(frozen=True)
class Setup:
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
    weight_config: CompressionConfig = Policy().comp_weight_config
    int8: bool = False       # Policy.int8_matmul

    @property
    def cuda(self) -> bool:
        return self.hw.compute_device == "cuda"

    @property
    def itemsize(self) -> int:
        return compute_dtype(self.hw.compute_device).itemsize

    @property
    def cache_to_device(self) -> bool:
        """Whether CPU and disk cache parts go to a CUDA device to be attended there, rather than
        being attended on the CPU as stored (kv_cache.attend_device)."""
        return self.cuda and not self.cpu_cache_compute

    def packed(self, phase: str) -> bool:
        """Whether steps of `phase` multiply 4-bit weights packed (schedule.run_layers' `defer`)."""
        return multiply_packed(self.b * (self.s if phase == "prefill" else 1), self.nb, self.weight_config,
                               not self.cuda)

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
           wcfg: CompressionConfig, int8_matmul: bool = False) -> tuple[dict, tuple]:
    """Each layer kind's tensors as the engine places them, and the schedule's sequence of kinds."""
    fam = model_family(cfg.family)
    itemsize = compute_dtype(hw.compute_device).itemsize

    def specs(kind):
        if kind != "decoder":
            return fam.layer_weights(cfg, kind)
        return fam.layer_weights(cfg, "attn") + fam.layer_weights(cfg, "mlp")

    kinds, seen = {}, {}       # seen: (checkpoint name, shape) -> midpoint where it is held
    for kind in ("embed", "attn", "mlp", "head") if sep_layer else ("embed", "decoder", "head"):
        named = [(s.name, tuple(s.shape), s.hf_name) for s in specs(kind)]
        sizes = [math.prod(sh) for _, sh, _ in named]
        total, done, tensors = max(1, sum(sizes)), 0, []
        for (name, shape, hf_name), n in zip(named, sizes):
            mid = (done + n / 2) / total * 100
            tied = kind == "head" and (hf_name, shape) in seen     # weights.place_layer shares it
            if kind == "embed":
                seen[(hf_name, shape)] = mid
            matmul = kind in ("attn", "mlp", "decoder") and len(shape) == 2
            if int8_matmul and matmul and not compress_weight:
                # weights.weight_format: int8 rows on every tier, a copy of the stored bytes off the gpu tier
                held = int8_format.nbytes(shape)
                tensors.append(_Tensor(n, mid, (held, held, aligned(held)), False, (held, "uint8"), held,
                                       int8=True))
                done += n
                continue
            q = compress_weight and len(shape) >= 2
            stored = compressed_nbytes(shape, wcfg) if q else n * storage_bytes
            on_gpu = compressed_nbytes(shape, wcfg) if q else n * itemsize
            lookup = q and kind == "embed" and name in LOOKUP_TABLES
            # the pool buffer LayerWeights.load borrows: packed bytes for a lookup table, else compute form
            work = (stored, "uint8") if lookup else padded_shape(shape, wcfg) if q else shape
            work_bytes = stored if lookup else math.prod(work) * itemsize
            requant = q and int8_matmul and matmul         # always a whole working copy, never packed
            # ... and when a step multiplies 2-D 4-bit weights packed, only linear's scratch
            scratch = (scratch_elems(shape, wcfg),) if q and not lookup and len(shape) == 2 and not requant else ()
            tensors.append(_Tensor(n, seen[(hf_name, shape)] if tied else mid, (on_gpu, stored, aligned(stored)), q,
                                   work, work_bytes, lookup, tied, scratch, math.prod(scratch) * itemsize,
                                   requant=requant))
            done += n
        kinds[kind] = _Kind(kind, tuple(tensors))
    middle = ("attn", "mlp") if sep_layer else ("decoder",)
    return kinds, ("embed",) + middle * cfg.num_layers + ("head",)


def thresholds(kinds: dict) -> list[float]:
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
class Placement:
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


def const_placement(policy: Policy) -> Placement:
    g, c, _ = policy.percents("w")
    n_g, n_c, _ = split_counts(policy.gpu_batch_size, policy.percents("cache"))
    return Placement(policy.gpu_batch_size, [(g, 1.0)], [(g + c, 1.0)], [(n_g, 1.0)], [(n_g + n_c, 1.0)],
                      {t: float(t == policy.act_tier) for t in TIERS})


# ---- the cost model ----------------------------------------------------------------------------------
def cache_row_bytes(st: Setup, tier: str, n: int) -> int:
    """Bytes of one cache row (one position) of n sequences on a tier, as kv_cache.cache_format holds it."""
    if n <= 0:
        return 0
    shape = (2, n, st.cfg.num_kv_heads, st.cfg.head_dim)
    if st.compress_cache:
        raw = compressed_nbytes(shape, st.cache_config)
    else:
        raw = math.prod(shape) * (st.itemsize if tier == "gpu" else st.storage_bytes)
    return aligned(raw) if tier == "disk" else raw


def compute_mb(st: Setup, kind: str, phase: str, t: float) -> float:
    """Main-thread seconds of one micro-batch through one layer (matmuls, attention, elementwise, overhead)."""
    cfg, hw, b = st.cfg, st.hw, st.b
    h, f, kv, e = cfg.hidden_size, cfg.ffn_dim, cfg.kv_dim, cfg.word_embed_proj_dim
    rows = b * (st.s if phase == "prefill" else 1)
    mm = lambda flops, m: flops / hw.matmul_rate(m)
    mm_layer = (lambda flops, m: flops / hw.int8_matmul_rate(m)) if st.int8 else mm    # decoder layers' products
    ew = lambda elems: elems * st.itemsize * 3 / hw.memcpy_bytes_per_s       # read twice, write once
    sec = MAIN_OPS[kind] * hw.op_overhead_s
    sec += hw.attn_layer_overhead_s if kind in ("attn", "decoder") else 0.0    # the layer's own ops, measured
    sec += hw.mlp_layer_overhead_s if kind in ("mlp", "decoder") else 0.0
    if kind in ("attn", "decoder"):
        sec += mm_layer(2 * rows * h * (2 * h + 2 * kv), rows) + ew(rows * 6 * h)
        if phase == "prefill":
            sec += 4 * b * st.s * st.s * h / hw.attn_prefill_flops
        else:   # [past | new] segments read once each, where they lie (ops.attend_any)
            sec += 2 * b * (t + 1) * kv / hw.attn_decode_elems_per_s
    if kind in ("mlp", "decoder"):
        mats = 2 if cfg.family == "opt" else 3
        sec += mm_layer(2 * rows * h * f * mats, rows) + ew(rows * (4 * h + 2 * f))
    if kind == "embed":
        sec += ew(rows * 3 * h) + (mm(2 * rows * h * e, rows) if e != h else 0.0)
    if kind == "head":      # the last position only, then sampling
        sec += mm(2 * b * e * cfg.vocab_size, b) + ew(b * cfg.vocab_size) + b * hw.op_overhead_s
    return sec


def rate(st: Setup, name: str) -> float:
    """A transfer rate as the thread doing it sees it: the I/O thread (one torch thread) with overlap,
    else the main thread."""
    return getattr(st.hw, f"io_{name}" if st.overlap else name)


def _widen(st: Setup, elems):
    """Seconds to make stored (not device-resident) plain elements compute-ready."""
    hw = st.hw
    if st.cuda:
        return elems * st.storage_bytes / hw.h2d_bytes_per_s
    return 0.0 if st.storage_bytes == st.itemsize else elems / rate(st, "convert_elems_per_s")


def _plain_elems(p: Placement, kind: _Kind) -> dict:
    """tier -> elements of the kind's plain (not 4-bit) weights homed there: what gets widened."""
    return p.weights(kind, "plain_elems", lambda x, tier: 0 if x.quantized or x.int8 else x.elems)


def _weight_load(st: Setup, p: Placement, kind: _Kind) -> tuple:
    """(I/O-thread seconds, of which CPU work) to load one layer's weights (LayerWeights.load)."""
    hw = st.hw
    plain = _plain_elems(p, kind)
    disk = p.weights(kind, "disk_bytes", lambda x, tier: x.nbytes[2])["disk"]
    n_disk = p.weights(kind, "tensors", lambda x, tier: 1)["disk"]
    widen = _widen(st, plain["cpu"] + plain["disk"]) if st.cuda else 0.0      # (on a CPU: in finish)
    copied = p.weights(kind, "int8_bytes", lambda x, tier: x.nbytes[0] if x.int8 and tier != "gpu" else 0)
    widen += (copied["cpu"] + copied["disk"]) / rate(st, "memcpy_bytes_per_s")
    cpu_work = widen + len(kind.tensors) * OPS_PER_TENSOR_LOAD * hw.op_overhead_s
    # a layer's disk-homed tensors share a file read at once: one latency when any is on disk,
    # counted as the share of its tensors on disk so that the LP's expression stays linear
    disk_wait = disk / hw.disk_read_bytes_per_s + n_disk / len(kind.tensors) * hw.disk_read_latency_s
    return cpu_work + disk_wait, cpu_work


def _weight_finish(st: Setup, p: Placement, kind: _Kind, phase: str) -> float:
    """Main-thread seconds to make the layer's weights compute-ready (LayerWeights.finish). On a CPU,
    plain stored weights off the gpu tier are widened there. 4-bit weights are dequantized once per block,
    or multiplied straight from the packed values once per micro-batch when
    the C kernel takes every micro-batch's rows (compression.multiply_packed). The kernel is counted
    at the probe's dequantize rate plus the multiply that compute_mb counts: since it multiplies four
    rows per unpacked value in registers, that overstates it (16 rows by a 16M-value weight: 7.4 ms,
    against 13.6 ms to dequantize alone), so the model leans away from packed multiplies."""
    quant = p.weights(kind, "quantized_elems",
                      lambda x, tier: x.elems if x.quantized and not x.lookup and not x.requant else 0)
    # requantized weights: dequantized once per block, then made int8 (counted at the same rate)
    requant = p.weights(kind, "requant_elems", lambda x, tier: 2 * x.elems if x.requant else 0)
    uses = st.nb if st.nb > 1 and not st.cuda and st.packed(phase) else 1
    widen = 0.0
    if not st.cuda and st.storage_bytes != st.itemsize:
        plain = _plain_elems(p, kind)
        widen = (plain["cpu"] + plain["disk"]) / st.hw.convert_elems_per_s
    return widen + (uses * sum(quant.values()) + sum(requant.values())) / st.hw.dequant_elems_per_s


def _cache_load(st: Setup, p: Placement, t: float) -> tuple:
    """(I/O-thread seconds, of which CPU work) to load one micro-batch's past keys/values of one layer."""
    hw, per_seq = st.hw, 2 * st.cfg.kv_dim * t
    seqs = p.cache("sequences", lambda tier, n: n)
    away = seqs["cpu"] + seqs["disk"]
    if st.compress_cache:
        cpu_work = st.b * per_seq / rate(st, "cache_dequant_elems_per_s")
    elif st.cache_to_device:
        cpu_work = _widen(st, away * per_seq)
    else:   # attended on the CPU as stored (the decode kernel widens in registers); disk rows are copied
        cpu_work = 0.0
    disk_rows = p.cache("row_bytes", lambda tier, n: cache_row_bytes(st, tier, n))["disk"]
    disk_reads = p.cache("parts", lambda tier, n: 1 if n > 0 and tier != "cpu" else 0)["disk"]
    cpu_work += 3 * OPS_PER_CACHE_PART * hw.op_overhead_s
    disk_wait = disk_rows * t / hw.disk_read_bytes_per_s + disk_reads * hw.disk_read_latency_s
    return cpu_work + disk_wait, cpu_work


def _cache_store(st: Setup, p: Placement, phase: str) -> tuple:
    """(I/O-thread seconds, of which CPU work) to store one micro-batch's new keys/values of one layer."""
    hw, q = st.hw, (st.s if phase == "prefill" else 1)
    elems = 2 * st.b * q * st.cfg.kv_dim
    on_gpu = p.cache("sequences", lambda tier, n: n)["gpu"] / st.b
    if st.compress_cache:
        cpu_work = elems / rate(st, "quant_elems_per_s")
    else:   # rounded through the storage dtype; on a CPU compute device the gpu tier widens it back
        cpu_work = (elems / rate(st, "narrow_elems_per_s")
                    + (0 if st.cuda else elems * on_gpu / rate(st, "convert_elems_per_s")))
    cpu_work += elems * st.itemsize * 3 / rate(st, "memcpy_bytes_per_s") + OPS_PER_CACHE_STORE * hw.op_overhead_s
    disk_rows = p.cache("row_bytes", lambda tier, n: cache_row_bytes(st, tier, n))["disk"]
    disk_writes = p.cache("parts", lambda tier, n: 1 if n > 0 and tier != "cpu" else 0)["disk"]
    disk_wait = disk_rows * q / hw.disk_write_bytes_per_s + disk_writes * hw.disk_write_latency_s
    return cpu_work + disk_wait, cpu_work


def _act_io(st: Setup, p: Placement, phase: str):
    """Main-thread seconds per micro-batch and layer to put and get hidden states on their tier."""
    hw = st.hw
    nbytes = st.b * (st.s if phase == "prefill" else 1) * st.cfg.hidden_size * 4   # held as float32 on disk
    disk = (aligned(nbytes) / hw.disk_write_bytes_per_s + nbytes / hw.disk_read_bytes_per_s
            + hw.disk_write_latency_s + hw.disk_read_latency_s + 40 * hw.op_overhead_s)
    cpu = nbytes / hw.d2h_bytes_per_s + nbytes / hw.h2d_bytes_per_s if st.cuda else 0.0
    return p.act["disk"] * disk + p.act["cpu"] * cpu


def slot_bounds(st: Setup, p: Placement, kind: str, nxt: str, phase: str) -> dict:
    """Named lower bounds on one slot's time: this layer's work plus the next layer's weight load."""
    t = st.s + max(0, st.gen - 2) / 2                       # mean cache length over the decode steps
    cache_layer = kind in ("attn", "decoder")
    compute = compute_mb(st, kind, phase, t)
    w_all, w_cpu = _weight_load(st, p, st.kinds[nxt])
    c_all, c_cpu = _cache_load(st, p, t) if cache_layer and phase == "decode" else (0.0, 0.0)
    s_all, s_cpu = _cache_store(st, p, phase) if cache_layer else (0.0, 0.0)
    main = _weight_finish(st, p, st.kinds[kind], phase) + st.nb * compute + st.nb * _act_io(st, p, phase)
    cache_io = st.nb * (c_all + s_all)
    if not st.overlap:
        return {"serial": main + w_all + cache_io}
    # one I/O thread for weights, one for the cache (schedule.py); both read the same disk
    bounds = {"main_thread": main, "weights_io_thread": w_all, "cache_io_thread": cache_io,
              "disk": w_all - w_cpu + st.nb * (c_all - c_cpu + s_all - s_cpu)}
    if cache_layer and phase == "decode":   # a layer's first cache load starts when the layer does
        bounds["first_cache_load"] = c_all + main
    if not st.cuda:   # the I/O thread's conversions and compute share the cores and the memory bus:
        # measured on 2 cores, they add up (compute slows by about what the conversions take)
        bounds["cpu_cores"] = main + w_cpu + st.nb * (c_cpu + s_cpu)
    return bounds


# ---- memory ----------------------------------------------------------------------------------------
def _working(st: Setup, p: Placement, kind: _Kind):
    """Bytes LayerWeights.working_bytes allocates on the compute device for one layer."""
    on = p.weights(kind, "working", lambda x, tier: x.work_bytes if _borrows(x, tier) else 0)
    return on["gpu"] + on["cpu"] + on["disk"]


def _borrows(x: _Tensor, tier: str) -> bool:
    """Whether the engine borrows a pool buffer for x homed on `tier` (in LayerWeights.load or finish)."""
    return tier != "gpu" or (x.quantized and not x.lookup)


def _widened(st: Setup, x: _Tensor, tier: str) -> bool:
    """Whether x homed on `tier` is a `Widen`: read as stored on the I/O thread, then widened into a
    pool buffer borrowed in LayerWeights.finish, on a CPU compute device only."""
    return not st.cuda and tier != "gpu" and not x.quantized and not x.int8


def _cache_copy_bytes(st: Setup, seqs: dict):
    """Bytes per cached element of one micro-batch that KVCache.read decodes into pool buffers
    (kv_cache.needs_copy), summed over its sequences: every sequence when 4-bit (dequantized to the
    compute dtype); else the disk ones in their stored dtype when the CPU attends them, or all off
    the device when CUDA does. CPU-resident parts the CPU attends are read in place."""
    if st.compress_cache:
        return st.b * st.itemsize
    if st.cache_to_device:
        return (st.b - seqs["gpu"]) * st.itemsize
    return seqs["disk"] * st.storage_bytes


def memory_terms(st: Setup, p: Placement) -> dict:
    """Named byte expressions: what each tier holds, and the engine's working copies and pre-flight terms."""
    cfg, b, nb = st.cfg, st.b, st.nb
    weights = {t: 0 for t in TIERS}
    for name, count in st.counts.items():
        on = p.weights(st.kinds[name], "held_bytes", lambda x, tier: 0 if x.tied else x.nbytes[TIERS.index(tier)])
        weights = {t: weights[t] + count * on[t] for t in TIERS}
    rows = p.cache("row_bytes", lambda tier, n: cache_row_bytes(st, tier, n))
    hidden = lambda q, tier: b * q * cfg.hidden_size * (4 if tier == "disk" else st.itemsize)
    working = {name: _working(st, p, st.kinds[name]) for name in st.kinds}
    copied = _cache_copy_bytes(st, p.cache("sequences", lambda tier, n: n))
    # phase -> shape -> kind -> (buffers of that shape one layer borrows in load, in finish)
    pooled, pool_bytes = {}, {}
    for phase in ("prefill", "decode"):
        packed = st.packed(phase)
        shapes = {x.borrowed(packed) for k in st.kinds.values() for x in k.tensors}
        pool_bytes[phase] = dict(shapes)
        for shape, _ in shapes:
            for name, kind in st.kinds.items():
                counts = []
                for at_finish in (False, True):
                    on = p.weights(kind, f"borrowed_{shape}_{phase}_{'finish' if at_finish else 'load'}",
                                   lambda x, tier: 1 if (x.borrowed(packed)[0] == shape and _borrows(x, tier)
                                                         and _widened(st, x, tier) == at_finish) else 0)
                    counts.append(on["gpu"] + on["cpu"] + on["disk"])
                pooled.setdefault(phase, {}).setdefault(shape, {})[name] = tuple(counts)
    return {
        "weights": weights,
        "cache": {t: rows[t] * st.max_len * cfg.num_layers * nb for t in TIERS},
        "act_prefill": {t: p.act[t] * nb * (aligned(hidden(st.s, t)) if t == "disk" else hidden(st.s, t))
                        for t in TIERS},
        "act_decode": {t: p.act[t] * nb * (aligned(hidden(1, t)) if t == "disk" else hidden(1, t)) for t in TIERS},
        "working_each": working,
        "pool_counts": pooled,
        "pool_bytes": pool_bytes,
        "cache_copies": min(2, nb) * copied * 2 * cfg.kv_dim * st.max_len,   # full-length buffers
        "preflight_act": {t: p.act[t] * nb * b * st.s * cfg.hidden_size * st.itemsize for t in TIERS},
        "preflight_cache_copies": 2 * copied * 2 * cfg.kv_dim * st.max_len,
        "transient": b * st.s * (cfg.ffn_dim + 6 * cfg.hidden_size) * st.itemsize + b * st.s * st.s * st.itemsize,
    }


def weight_elems(st: Setup) -> int:
    return sum(t.elems for name in st.plan for t in st.kinds[name].tensors)


# ---- one concrete policy ---------------------------------------------------------------------------
def predict(config: ModelConfig, hardware: Hardware, policy: Policy, prompt_len: int, gen_len: int, *,
            storage_bytes: int = 2, gpu_mem=None, cpu_mem=None, disk_mem=None) -> Prediction:
    """The cost model's throughput, times and peaks for `policy` on this hardware and workload."""
    st = make_setup(config, hardware, prompt_len, gen_len, policy.gpu_batch_size, policy.num_gpu_batches,
                policy.compress_weight, policy.compress_cache, policy.cpu_cache_compute, policy.overlap,
                storage_bytes, policy.sep_layer, caps_for(hardware, gpu_mem, cpu_mem, disk_mem),
                policy.comp_weight_config, policy.comp_cache_config, int8=policy.int8_matmul)
    p = const_placement(policy)
    breakdown, prefill, step = {}, 0.0, 0.0
    for (kind, nxt), count in st.slots.items():
        for phase in ("prefill", "decode"):
            sec = max(slot_bounds(st, p, kind, nxt, phase).values())
            breakdown[(phase, f"{kind}->{nxt}")] = sec * count
            if phase == "prefill":
                prefill += sec * count
            else:
                step += sec * count
    decode = step * max(0, gen_len - 1)
    m = memory_terms(st, p)
    pool = {phase: _pooled(st, m, phase) for phase in ("prefill", "decode")}
    peaks, preflight = _peaks(st, m, pool, max)
    fits = all(preflight[t] <= st.caps[t] and m["weights"][t] <= st.caps[t] for t in TIERS)
    tokens = policy.block_size * gen_len
    return Prediction(policy, tokens / (prefill + decode), prefill, decode, peaks, preflight, fits, pool, breakdown)


def _peaks(st: Setup, m: dict, pooled: dict, biggest) -> tuple[dict, dict]:
    """(tracker peaks, pre-flight need including weights) per tier, for a concrete placement.

    On the compute device the engine's buffer pool keeps, for every tensor shape, as many working
    copies as two neighbouring layers ever borrow at once (all of them when the next layer loads
    before this one is done, as without overlap; fewer when the I/O thread runs late, so with overlap
    this is an upper bound), and trims idle ones when the budget is hit and when the phase changes
    what it borrows (whole copies for prefill, scratch for packed multiplies in decode): `pooled`,
    phase -> those bytes (_pooled)."""
    peaks = {}
    for t in TIERS:
        base = m["weights"][t] + m["cache"][t]
        pre = base + m["act_prefill"][t] + (pooled["prefill"] if t == "gpu" else 0)
        dec = base + m["act_decode"][t] + (pooled["decode"] + m["cache_copies"] if t == "gpu" else 0)
        peaks[t] = max(pre, dec)
    peaks["gpu"] = min(peaks["gpu"], st.caps["gpu"])
    preflight = {t: m["weights"][t] + m["cache"][t] + m["preflight_act"][t] for t in TIERS}
    preflight["gpu"] += 2 * biggest(m["working_each"].values()) + m["preflight_cache_copies"]
    return peaks, preflight


def _pooled(st: Setup, m: dict, phase: str):
    """Bytes of working buffers the pool holds in `phase`: per shape, the most held at once (pool_copies)."""
    return sum(m["pool_bytes"][phase][shape] * max(pool_copies(counts, a, c) for a, c in st.slots)
               for shape, counts in m["pool_counts"][phase].items())


def pool_copies(counts: dict, a: str, c: str):
    """Buffers of one shape held while layer kind `a` is finished, before layer kind `c`: what `a`
    borrowed in load and borrows in finish, and what `c`, prefetched by then, borrowed in load."""
    return counts[a][0] + counts[a][1] + counts[c][0]


def caps_for(hw: Hardware, gpu_mem, cpu_mem, disk_mem) -> dict:
    caps = {"gpu": hw.gpu_mem, "cpu": hw.cpu_mem, "disk": hw.disk_mem}
    for t, v in (("gpu", gpu_mem), ("cpu", cpu_mem), ("disk", disk_mem)):
        if v is not None:
            caps[t] = parse_bytes(v)
    return caps


def make_setup(cfg, hw, s, gen, b, nb, cw, cc, ccc, overlap, storage_bytes, sep_layer, caps,
           wcfg: CompressionConfig = Policy().comp_weight_config,
           ccfg: CompressionConfig = Policy().comp_cache_config, int8: bool = False) -> Setup:
    kinds, plan = _kinds(cfg, hw, cw, storage_bytes, sep_layer, wcfg, int8)
    return Setup(cfg, hw, s, gen, b, nb, cw, cc, ccc, overlap, storage_bytes, kinds, plan, caps, ccfg, wcfg, int8)
