"""The placement plan: where each tensor lives, in what format, and what using it borrows, when.

One source of truth for three readers. The engine executes it (`weights.place_layer` homes each
weight by its `TensorPlan`, `transfer.WeightLoad` borrows what `TensorPlan.borrow` names,
`kv_cache.KVCache` lays out and reads its parts by `CachePartPlan`); the cost model and the LP sum
over it (`engine.cost_model`); the engine's pre-flight check adds it up (`preflight_need`).

Everything here is a pure function of the model config, the policy's precision (`Precision`)
and, for a tensor, the tier it lands on: the LP evaluates a plan on every tier to build
expressions over the choice of tier, while the engine evaluates it on the one tier a policy picks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compression import CompressionConfig, scratch_elems
from .config import ModelConfig
from .disk import aligned
from .formats import Format, compute_dtype
from .models import LOOKUP_TABLES, WeightSpec, family
from .policy import TIERS, Policy

# The engine keeps two layers' weights in flight (weights_now computing while weights_next loads)
# and two micro-batches' cache reads (the one attending while the next one loads).
LAYERS_IN_FLIGHT = 2
CACHE_READS_IN_FLIGHT = 2


@dataclass(frozen=True)
class Precision:
    """What, besides the tier, decides how a tensor is held and read: the compute device and the
    policy's storage choices."""
    device: str                              # compute device type: "cuda" or "cpu"
    storage: torch.dtype                     # storage dtype of plain weights and cache off the device
    compress_weight: bool = False
    weight_config: CompressionConfig = Policy().comp_weight_config
    int8_matmul: bool = False
    compress_cache: bool = False
    cache_config: CompressionConfig = Policy().comp_cache_config
    cpu_cache_compute: bool = False

    @classmethod
    def of(cls, policy: Policy, device: str, storage: torch.dtype) -> "Precision":
        return cls(device, storage, policy.compress_weight, policy.comp_weight_config, policy.int8_matmul,
                   policy.compress_cache, policy.comp_cache_config, policy.cpu_cache_compute)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.device)


def tier_at(mid: float, percents: tuple[float, float, float]) -> str:
    """FlexGen's rule: a tensor goes to the tier whose percentage range holds its midpoint."""
    return "gpu" if mid < percents[0] else "cpu" if mid < percents[0] + percents[1] else "disk"


# ---- weights ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Borrow:
    """A pool buffer a layer load borrows for one tensor; every borrow is given back when the layer is
    done (`transfer.WeightLoad.close`)."""
    shape: tuple
    dtype: torch.dtype
    at: str                  # "load": on the I/O thread, with the read; "finish": on the computing thread

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def key(self) -> tuple:
        """What the pool reuses buffers by (the device is always the compute device)."""
        return self.shape, self.dtype


@dataclass(frozen=True)
class TensorPlan:
    """One weight of one layer: its tier-independent facts, and per tier its format and borrows."""
    name: str                # the key the family's functions read
    hf_name: str             # the checkpoint key
    shape: tuple
    mid: float               # midpoint of its elements within its layer, in percent (`tier_at`); for a
    #                          tied tensor, the midpoint of the one it shares (that tensor's tier is its)
    tied: bool               # shares a tensor an earlier layer holds (a tied LM head): stored there only
    lookup: bool             # a table `embed` only gathers rows of: a quantized one is used packed
    requant: bool            # held 4-bit; a load for steps that multiply packed uses it as 4-bit,
    #                          any other load makes it int8 rows in a whole working copy
    matmul: bool             # a decoder layer's 2-D weight only `ops.linear` reads
    precision: Precision

    @property
    def elems(self) -> int:
        return math.prod(self.shape)

    def __post_init__(self):
        # the LP asks these many times per candidate: work them out once per tier
        object.__setattr__(self, "_formats", {t: self._format(t) for t in TIERS})

    def _format(self, tier: str) -> Format:
        p = self.precision
        if self.matmul and p.int8_matmul and len(self.shape) == 2 and not self.requant:
            return Format(torch.int8, int8=True)
        quant = p.weight_config if p.compress_weight and len(self.shape) >= 2 else None
        if tier == "gpu":
            return Format(p.compute_dtype, round_to=p.storage, quant=quant)
        return Format(p.storage, quant=quant)

    def format(self, tier: str) -> Format:
        """How it is held on `tier`: int8 rows under int8_matmul (unless it is requantized from
        4-bit), 4-bit with compress_weight (2-D and larger), else plain, compute-ready on the gpu tier."""
        return self._formats[tier]

    @property
    def quantized(self) -> bool:
        return self.format("cpu").quant is not None

    @property
    def int8(self) -> bool:
        return self.format("cpu").int8

    def row_bytes(self, tier: str) -> int:
        return self.format(tier).row_bytes(self.shape)

    def stored_bytes(self, tier: str) -> int:
        """Bytes of its array on `tier` (a disk row takes whole 4 KiB blocks)."""
        n = self.row_bytes(tier)
        return aligned(n) if tier == "disk" else n

    def held_bytes(self, tier: str) -> int:
        """Bytes this layer adds to `tier`: none for a tied tensor."""
        return 0 if self.tied else self.stored_bytes(tier)

    def how(self, tier: str) -> str:
        """How a load makes it ready to compute with, homed on `tier` (transfer.WeightLoad):
        "stored"   computed with as stored (int8 rows, a quantized lookup table): a view on the gpu
                   tier, else a copy of its bytes;
        "view"     compute-ready where it lives;
        "widen"    plain, read as stored and widened on the computing thread (a CPU compute device);
        "dequantize" quantized: dequantized on the computing thread, or multiplied packed;
        "decode"   plain, decoded into a working copy as it is read (CUDA: the copy widens)."""
        fmt = self.format(tier)
        if (self.lookup and fmt.quant is not None) or fmt.int8:
            return "stored"
        if tier == "gpu" and fmt.quant is None and fmt.dtype == self.precision.compute_dtype:
            return "view"
        if fmt.quant is None and self.precision.device == "cpu":
            return "widen"
        return "dequantize" if fmt.quant is not None else "decode"

    def borrow(self, tier: str, packed: bool = False) -> Borrow | None:
        """The pool buffer a load borrows for it homed on `tier`, or None. `packed`: the step
        multiplies 2-D 4-bit weights straight from the packed values, so those borrow only
        `compression.linear`'s scratch (requantized ones too: such steps multiply them as 4-bit)."""
        how, fmt, dtype = self.how(tier), self.format(tier), self.precision.compute_dtype
        if how == "view" or how == "stored" and tier == "gpu":
            return None
        if how == "stored":
            return Borrow((fmt.row_bytes(self.shape),), torch.uint8, "load")
        if how == "widen":
            return Borrow(fmt.work_shape(self.shape), dtype, "finish")
        if packed and fmt.quant is not None and len(self.shape) == 2:
            return Borrow((scratch_elems(self.shape, fmt.quant),), dtype, "load")
        return Borrow(fmt.work_shape(self.shape), dtype, "load")

    def working_bytes(self, tier: str, packed: bool = False) -> int:
        b = self.borrow(tier, packed)
        return b.nbytes if b is not None else 0


def plan_layer(specs: list[WeightSpec], precision: Precision, matmul: bool,
               earlier: dict | None = None) -> list[TensorPlan]:
    """The plans of one layer's weights. `matmul`: a decoder layer (attention, MLP), whose 2-D
    weights only `ops.linear` reads. `earlier` maps (checkpoint name, shape) to the midpoint where
    an earlier layer holds that tensor (None where that does not matter: the engine shares the
    array wherever it is), and gets this layer's: a tensor found there is tied to it."""
    earlier = {} if earlier is None else earlier
    sizes = [math.prod(s.shape) for s in specs]
    total, done, out = max(1, sum(sizes)), 0, []
    p = precision
    for spec, n in zip(specs, sizes):
        mid = (done + n / 2) / total * 100
        done += n
        key = (spec.hf_name, tuple(spec.shape))
        tied = key in earlier
        requant = matmul and p.int8_matmul and p.compress_weight and len(spec.shape) == 2
        held_at = earlier.get(key)
        out.append(TensorPlan(spec.name, spec.hf_name, tuple(spec.shape), held_at if held_at is not None else mid,
                              tied, spec.name in LOOKUP_TABLES, requant, matmul, precision))
        earlier.setdefault(key, mid)
    return out


def layer_specs(config: ModelConfig, kind: str) -> list[WeightSpec]:
    """The weights of a layer of `kind` (embed, attn, mlp, decoder = attn + mlp, head), as the
    engine names them ({i} unresolved)."""
    fam = family(config.family)
    if kind != "decoder":
        return fam.layer_weights(config, kind)
    return ([WeightSpec("attn." + s.name, s.hf_name, s.shape) for s in fam.layer_weights(config, "attn")]
            + [WeightSpec("mlp." + s.name, s.hf_name, s.shape) for s in fam.layer_weights(config, "mlp")])


def plan_kinds(config: ModelConfig, precision: Precision, sep_layer: bool) -> dict[str, list[TensorPlan]]:
    """kind -> the plans of one layer of that kind, for a model the schedule runs whole."""
    kinds = ("embed", "attn", "mlp", "head") if sep_layer else ("embed", "decoder", "head")
    earlier = {}
    out = {}
    for kind in kinds:
        # only the embedding is ever shared (by a tied head); decoder layers name their own tensors
        out[kind] = plan_layer(layer_specs(config, kind), precision, kind not in ("embed", "head"),
                               earlier if kind in ("embed", "head") else None)
    return out


# ---- KV cache --------------------------------------------------------------------------------------
def split_counts(n: int, percents: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sequences per tier (gpu, cpu, disk) for a micro-batch of n."""
    g = round(n * percents[0] / 100)
    gc = round(n * (percents[0] + percents[1]) / 100)
    return g, gc - g, n - gc


@dataclass(frozen=True)
class CachePartPlan:
    """The part of a micro-batch's KV cache on one tier: n sequences, one row per position, each
    row (2, n, n_kv, head_dim), keys then values."""
    tier: str
    n_seq: int
    n_kv: int
    head_dim: int
    precision: Precision

    @property
    def row_shape(self) -> tuple:
        return 2, self.n_seq, self.n_kv, self.head_dim

    @property
    def format(self) -> Format:
        p = self.precision
        quant = p.cache_config if p.compress_cache else None
        if self.tier == "gpu":
            return Format(p.compute_dtype, round_to=p.storage, quant=quant)
        return Format(p.storage, quant=quant)

    @property
    def stored_row_bytes(self) -> int:
        """Bytes one position takes on the tier (a disk row takes whole 4 KiB blocks)."""
        if self.n_seq <= 0:
            return 0
        n = self.format.row_bytes(self.row_shape)
        return aligned(n) if self.tier == "disk" else n

    @property
    def attend_on(self) -> str:
        """Type of the device that attends over this part: the CPU for CPU and disk parts with
        cpu_cache_compute, else the compute device."""
        p = self.precision
        return "cpu" if p.cpu_cache_compute and self.tier != "gpu" else p.device

    @property
    def read_dtype(self) -> torch.dtype:
        """The dtype it is attended in: the compute dtype on the compute device; on a CPU that
        attends, the stored dtype (fp16 is widened in registers by the decode kernel), or float32
        for a 4-bit cache, which has to be dequantized anyway."""
        fmt = self.format
        if self.attend_on != "cpu":
            return self.precision.compute_dtype
        return torch.float32 if fmt.quant is not None else fmt.dtype

    @property
    def copied(self) -> bool:
        """Whether reading it decodes it into a borrowed buffer rather than viewing it: yes from
        disk, when 4-bit, and when it must cross to another device or dtype."""
        fmt = self.format
        if self.tier == "disk" or fmt.quant is not None:
            return True
        lives_on = self.precision.device if self.tier == "gpu" else "cpu"
        return lives_on != self.attend_on or fmt.dtype != self.read_dtype

    def copy_bytes(self, max_len: int) -> int:
        """Bytes of the buffer a read borrows: every position up to max_len, so one serves every step."""
        return max_len * math.prod(self.row_shape) * self.read_dtype.itemsize if self.copied else 0


def plan_cache(n_seq: int, n_kv: int, head_dim: int, percents, precision: Precision) -> list[CachePartPlan]:
    """The parts of one micro-batch's cache of one layer, in tier order, empty tiers left out."""
    return [CachePartPlan(tier, n, n_kv, head_dim, precision)
            for tier, n in zip(TIERS, split_counts(n_seq, percents)) if n]


# ---- the pre-flight check --------------------------------------------------------------------------
def preflight_need(cache_rows: dict, max_len: int, n_layers: int, act_bytes: dict, layer_working,
                   cache_copies) -> dict:
    """Bytes per tier a block asks for beyond the placed weights, as the engine checks before
    work starts: its KV cache (`cache_rows`: tier -> bytes of one position of every micro-batch,
    over `n_layers` attention layers), its prompt's hidden states (`act_bytes`, tier -> bytes), and
    on the compute device the working copies of the two layers in flight (`layer_working`: the
    most one layer borrows) and two micro-batches' cache reads (`cache_copies`: one micro-batch's
    borrowed cache buffers for one layer). Works on numbers and on LP expressions alike."""
    need = {t: cache_rows[t] * max_len * n_layers + act_bytes[t] for t in TIERS}
    need["gpu"] += LAYERS_IN_FLIGHT * layer_working + CACHE_READS_IN_FLIGHT * cache_copies
    return need
