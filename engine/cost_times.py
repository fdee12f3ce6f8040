"""The cost model's times: seconds of one layer slot of the block schedule, as named lower bounds.

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
their first micro-batch's cache load, which starts with the layer. Every function takes a
`cost_model.Setup` and `cost_model.Placement`, so that it evaluates to a float for a concrete
policy and to a pulp expression inside the program.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import kernels
from .disk import aligned

if TYPE_CHECKING:
    from .cost_model import LayerKind, Placement, Setup

# torch calls per (layer, micro-batch) on the main thread, including the schedule's own bookkeeping
MAIN_OPS = {"embed": 14, "attn": 12, "mlp": 12, "decoder": 16, "head": 16}   # (attn/mlp: the schedule's share)
# torch calls of transfer bookkeeping: per weight tensor loaded, per cache part read, per cache store
OPS_PER_TENSOR_LOAD, OPS_PER_CACHE_PART, OPS_PER_CACHE_STORE = 5, 8, 14
# Hidden states on the disk tier: each put makes a TierArray with a file of its own (create, reserve,
# unlink), encodes and writes one row, each get reads and decodes it, each drop closes the file;
# besides the bytes and the two request latencies, that is counted as this many calls' overhead.
OPS_PER_DISK_ACTIVATION = 40

def compute_mb(st: Setup, kind: str, phase: str, t: float) -> float:
    """Main-thread seconds of one micro-batch through one layer (matmuls, attention, elementwise, overhead)."""
    cfg, hw, b = st.cfg, st.hw, st.b
    h, f, kv, e = cfg.hidden_size, cfg.ffn_dim, cfg.kv_dim, cfg.word_embed_proj_dim
    rows = b * (st.s if phase == "prefill" else 1)
    mm = lambda flops, m: flops / hw.matmul_rate(m)
    # decoder layers' products: int8 under int8_matmul, except where steps multiply 4-bit weights
    # packed (requantized ones included: transfer.WeightLoad.finish)
    int8_products = st.int8 and not (st.compress_weight and st.packed(phase))
    mm_layer = (lambda flops, m: flops / hw.int8_matmul_rate(m)) if int8_products else mm
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


def _plain_elems(p: Placement, kind: LayerKind) -> dict:
    """tier -> elements of the kind's plain (not 4-bit) weights homed there: what gets widened."""
    return p.weights(kind, "plain_elems", lambda x, tier: 0 if x.quantized or x.int8 else x.elems)


def _weight_load(st: Setup, p: Placement, kind: LayerKind) -> tuple:
    """(I/O-thread seconds, of which CPU work) to load one layer's weights (transfer.WeightLoad's read)."""
    hw = st.hw
    plain = _plain_elems(p, kind)
    disk = p.weights(kind, "disk_bytes", lambda x, tier: x.stored_bytes("disk"))["disk"]
    n_disk = p.weights(kind, "tensors", lambda x, tier: 1)["disk"]
    widen = _widen(st, plain["cpu"] + plain["disk"]) if st.cuda else 0.0      # (on a CPU: in finish)
    copied = p.weights(kind, "int8_bytes", lambda x, tier: x.row_bytes(tier) if x.int8 and tier != "gpu" else 0)
    widen += (copied["cpu"] + copied["disk"]) / rate(st, "memcpy_bytes_per_s")
    cpu_work = widen + len(kind.tensors) * OPS_PER_TENSOR_LOAD * hw.op_overhead_s
    # a layer's disk-homed tensors share a file read at once: one latency when any is on disk,
    # counted as the share of its tensors on disk so that the LP's expression stays linear
    disk_wait = disk / hw.disk_read_bytes_per_s + n_disk / len(kind.tensors) * hw.disk_read_latency_s
    return cpu_work + disk_wait, cpu_work


def _weight_finish(st: Setup, p: Placement, kind: LayerKind, phase: str) -> float:
    """Main-thread seconds to make the layer's weights compute-ready (transfer.WeightLoad.finish). On a CPU,
    plain stored weights off the gpu tier are widened there. 4-bit weights are dequantized once per block,
    or multiplied straight from the packed values once per micro-batch when
    the C kernel takes every micro-batch's rows (compression.multiply_packed). The kernel is counted
    at the probe's dequantize rate plus the multiply that compute_mb counts: since it multiplies four
    rows per unpacked value in registers, that overstates it (16 rows by a 16M-value weight: 7.4 ms,
    against 13.6 ms to dequantize alone), so the model leans away from packed multiplies."""
    quant = p.weights(kind, "quantized_elems",
                      lambda x, tier: x.elems if x.quantized and not x.lookup and not x.requant else 0)
    requant = p.weights(kind, "requant_elems", lambda x, tier: x.elems if x.requant else 0)
    packed = not st.cuda and st.packed(phase)
    uses = st.nb if st.nb > 1 and packed else 1
    # requantized weights multiply packed like the others where steps do; else they are made int8 rows
    # once per block: dequantized, then quantized (two passes at the dequantize rate), or straight from
    # the packed values by the C kernel (int8.from_4bit: 1.0-1.07 dequantizes for 1.5B-sized matrices)
    passes = 1 if kernels.int8_rows_from_4bit() is not None else 2
    elems = uses * (sum(quant.values()) + sum(requant.values())) if packed else \
        uses * sum(quant.values()) + passes * sum(requant.values())
    widen = 0.0
    if not st.cuda and st.storage_bytes != st.itemsize:
        plain = _plain_elems(p, kind)
        widen = (plain["cpu"] + plain["disk"]) / st.hw.convert_elems_per_s
    return widen + elems / st.hw.dequant_elems_per_s


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
    disk_rows = p.cache("row_bytes", lambda tier, n: st.cache_part(tier, n).stored_row_bytes)["disk"]
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
    disk_rows = p.cache("row_bytes", lambda tier, n: st.cache_part(tier, n).stored_row_bytes)["disk"]
    disk_writes = p.cache("parts", lambda tier, n: 1 if n > 0 and tier != "cpu" else 0)["disk"]
    disk_wait = disk_rows * q / hw.disk_write_bytes_per_s + disk_writes * hw.disk_write_latency_s
    return cpu_work + disk_wait, cpu_work


def _act_io(st: Setup, p: Placement, phase: str):
    """Main-thread seconds per micro-batch and layer to put and get hidden states on their tier."""
    hw = st.hw
    nbytes = st.b * (st.s if phase == "prefill" else 1) * st.cfg.hidden_size * 4   # held as float32 on disk
    disk = (aligned(nbytes) / hw.disk_write_bytes_per_s + nbytes / hw.disk_read_bytes_per_s
            + hw.disk_write_latency_s + hw.disk_read_latency_s + OPS_PER_DISK_ACTIVATION * hw.op_overhead_s)
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
