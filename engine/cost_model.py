"""The cost model of one block of the schedule: seconds per layer slot and bytes per tier.

Its times are in `engine.cost_times`. Its bytes are sums over the engine's own placement plan
(`engine.placement`): each weight's bytes on its tier and the pool buffers its load borrows, each
cache part's rows and read buffers, and the engine's pre-flight check (`placement.preflight_need`),
so that it cannot drift from what the engine does. Memory peaks mirror the engine's trackers:
weights homed per tier in that tier's format, the block's KV cache, the hidden states, and on the
compute device the buffer pool's working copies (two neighbouring layers' weights, two
micro-batches' cache); the pre-flight check is a term too, so a chosen policy never fails it.

Every expression is written once over `Placement` selectors, so it evaluates to a float for a
concrete policy (`predict`) and to a pulp expression inside the program (`engine.policy_search`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pulp
import torch

from .accounting import parse_bytes
from .compression import multiply_packed
from .config import ModelConfig
from .cost_times import slot_bounds
from .disk import aligned
from .hardware import Hardware
from .placement import (CACHE_READS_IN_FLIGHT, CachePartPlan, Precision, TensorPlan, plan_kinds, preflight_need,
                        split_counts)
from .policy import TIERS, Policy

PROCESS_BASE_BYTES = 600 << 20       # torch + Python resident before any tensor (RAM check only)
# Untracked temporaries of one prefill micro-batch in a layer, on top of the trackers (RAM check
# only): about six hidden-sized activations alive at once (the input, its normed copy, q, k, v and
# the attention output), the MLP's intermediate (ffn-sized), and the attention mask bias (s x s
# positions a sequence).
HIDDEN_TEMPORARIES = 6


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
class LayerKind:
    name: str                # embed | attn | mlp | decoder | head
    tensors: tuple           # the placement plan of one layer of this kind (placement.TensorPlan each)

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
    b: int                   # gpu_batch_size: sequences per micro-batch
    nb: int                  # num_gpu_batches: micro-batches per block
    precision: Precision
    overlap: bool
    kinds: dict              # name -> LayerKind
    plan: tuple              # kind names in schedule order
    caps: dict               # tier -> bytes

    compress_weight = property(lambda self: self.precision.compress_weight)
    compress_cache = property(lambda self: self.precision.compress_cache)
    cpu_cache_compute = property(lambda self: self.precision.cpu_cache_compute)
    int8 = property(lambda self: self.precision.int8_matmul)
    weight_config = property(lambda self: self.precision.weight_config)
    cache_config = property(lambda self: self.precision.cache_config)
    storage_bytes = property(lambda self: self.precision.storage.itemsize)

    @property
    def cuda(self) -> bool:
        return self.hw.compute_device == "cuda"

    @property
    def itemsize(self) -> int:
        return self.precision.compute_dtype.itemsize

    @property
    def cache_to_device(self) -> bool:
        """Whether CPU and disk cache parts go to a CUDA device to be attended there, rather than
        being attended on the CPU as stored (placement.CachePartPlan.attend_on)."""
        return self.cuda and not self.cpu_cache_compute

    def packed(self, phase: str) -> bool:
        """Whether steps of `phase` multiply 4-bit weights packed (schedule.run_layers' `defer`)."""
        return multiply_packed(self.b * (self.s if phase == "prefill" else 1), self.nb, self.weight_config,
                               not self.cuda)

    def cache_part(self, tier: str, n: int) -> CachePartPlan:
        """The plan of n sequences' cache of one layer on `tier`."""
        return CachePartPlan(tier, n, self.cfg.num_kv_heads, self.cfg.head_dim, self.precision)

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


def storage_dtype(storage_bytes: int) -> torch.dtype:
    """A storage dtype of this size: the cost model only counts bytes, and bfloat16 holds as float16 does."""
    return {2: torch.float16, 4: torch.float32}[storage_bytes]


def make_setup(cfg: ModelConfig, hw: Hardware, *, prompt_len: int, gen_len: int, gpu_batch_size: int,
               num_gpu_batches: int, precision: Precision, overlap: bool, sep_layer: bool, caps: dict) -> Setup:
    """The candidate's Setup: the model's layer kinds as the engine plans them, in schedule order."""
    kinds = {name: LayerKind(name, tuple(tensors)) for name, tensors in plan_kinds(cfg, precision, sep_layer).items()}
    middle = ("attn", "mlp") if sep_layer else ("decoder",)
    plan = ("embed",) + middle * cfg.num_layers + ("head",)
    return Setup(cfg, hw, prompt_len, gen_len, gpu_batch_size, num_gpu_batches, precision, overlap, kinds, plan,
                 caps)


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

    def weights(self, kind: LayerKind, key: str, what) -> dict:
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

    def _weights(self, kind: LayerKind, what) -> dict:
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



# ---- memory ----------------------------------------------------------------------------------------
def cache_row_bytes(st: Setup, tier: str, n: int) -> int:
    """Bytes of one cache row (one position) of n sequences on a tier, as the engine holds it."""
    return st.cache_part(tier, n).stored_row_bytes


def memory_terms(st: Setup, p: Placement) -> dict:
    """Named byte expressions: what each tier holds, and the engine's working copies and pre-flight terms."""
    cfg, b, nb = st.cfg, st.b, st.nb
    weights = {t: 0 for t in TIERS}
    for name, count in st.counts.items():
        on = p.weights(st.kinds[name], "held_bytes", lambda x, tier: x.held_bytes(tier))
        weights = {t: weights[t] + count * on[t] for t in TIERS}
    rows = p.cache("row_bytes", lambda tier, n: cache_row_bytes(st, tier, n))
    copies = p.cache("copy_bytes", lambda tier, n: st.cache_part(tier, n).copy_bytes(st.max_len))
    copied = copies["gpu"] + copies["cpu"] + copies["disk"]      # one micro-batch's read buffers, one layer
    hidden = lambda q, tier: b * q * cfg.hidden_size * (4 if tier == "disk" else st.itemsize)
    working = {}
    for name, kind in st.kinds.items():    # what one layer's load borrows (the pre-flight check's measure)
        on = p.weights(kind, "working", lambda x, tier: x.working_bytes(tier))
        working[name] = on["gpu"] + on["cpu"] + on["disk"]
    # phase -> buffer key -> kind -> (buffers of that key one layer borrows at load, at finish)
    pooled, pool_bytes = {}, {}
    for phase in ("prefill", "decode"):
        packed = st.packed(phase)
        borrows = {x.borrow(t, packed) for k in st.kinds.values() for x in k.tensors for t in TIERS} - {None}
        pool_bytes[phase] = {bw.key: bw.nbytes for bw in borrows}
        for key in pool_bytes[phase]:
            for name, kind in st.kinds.items():
                counts = []
                for at in ("load", "finish"):
                    on = p.weights(kind, f"borrowed_{key}_{phase}_{at}",
                                   lambda x, tier: _borrows(x, tier, packed, key, at))
                    counts.append(on["gpu"] + on["cpu"] + on["disk"])
                pooled.setdefault(phase, {}).setdefault(key, {})[name] = tuple(counts)
    return {
        "weights": weights,
        "cache": {t: rows[t] * st.max_len * cfg.num_layers * nb for t in TIERS},
        "act_prefill": {t: p.act[t] * nb * (aligned(hidden(st.s, t)) if t == "disk" else hidden(st.s, t))
                        for t in TIERS},
        "act_decode": {t: p.act[t] * nb * (aligned(hidden(1, t)) if t == "disk" else hidden(1, t)) for t in TIERS},
        "working_each": working,
        "pool_counts": pooled,
        "pool_bytes": pool_bytes,
        "cache_copies": min(CACHE_READS_IN_FLIGHT, nb) * copied,
        "cache_rows": {t: rows[t] * nb for t in TIERS},
        "cache_copy": copied,
        "preflight_act": {t: p.act[t] * nb * b * st.s * cfg.hidden_size * st.itemsize for t in TIERS},
        "transient": transient_bytes(st),
    }


def transient_bytes(st: Setup) -> int:
    """Untracked temporaries of one prefill micro-batch in a layer (HIDDEN_TEMPORARIES)."""
    return st.b * st.s * (st.cfg.ffn_dim + HIDDEN_TEMPORARIES * st.cfg.hidden_size + st.s) * st.itemsize


def _borrows(x: TensorPlan, tier: str, packed: bool, key: tuple, at: str) -> int:
    """1 if x homed on `tier` borrows a buffer of `key` at `at` (load or finish), else 0."""
    bw = x.borrow(tier, packed)
    return 1 if bw is not None and bw.key == key and bw.at == at else 0


def preflight(st: Setup, m: dict, layer_working) -> dict:
    """tier -> bytes the engine's pre-flight check asks for, the placed weights included;
    `layer_working`: the most one layer's load borrows (a number, or an LP variable bounding it)."""
    need = preflight_need(m["cache_rows"], st.max_len, st.cfg.num_layers, m["preflight_act"], layer_working,
                          m["cache_copy"])
    return {t: m["weights"][t] + need[t] for t in TIERS}


def weight_elems(st: Setup) -> int:
    return sum(t.elems for name in st.plan for t in st.kinds[name].tensors)


# ---- one concrete policy ---------------------------------------------------------------------------
def predict(config: ModelConfig, hardware: Hardware, policy: Policy, prompt_len: int, gen_len: int, *,
            storage_bytes: int = 2, gpu_mem=None, cpu_mem=None, disk_mem=None) -> Prediction:
    """The cost model's throughput, times and peaks for `policy` on this hardware and workload."""
    st = make_setup(config, hardware, prompt_len=prompt_len, gen_len=gen_len, gpu_batch_size=policy.gpu_batch_size,
                    num_gpu_batches=policy.num_gpu_batches,
                    precision=Precision.of(policy, hardware.compute_device, storage_dtype(storage_bytes)),
                    overlap=policy.overlap, sep_layer=policy.sep_layer,
                    caps=caps_for(hardware, gpu_mem, cpu_mem, disk_mem))
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
    peaks = _peaks(st, m, pool)
    need = preflight(st, m, max(m["working_each"].values()))
    fits = all(need[t] <= st.caps[t] and m["weights"][t] <= st.caps[t] for t in TIERS)
    tokens = policy.block_size * gen_len
    return Prediction(policy, tokens / (prefill + decode), prefill, decode, peaks, need, fits, pool, breakdown)


def _peaks(st: Setup, m: dict, pooled: dict) -> dict:
    """Tracker peaks per tier, for a concrete placement.

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
    return peaks


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
