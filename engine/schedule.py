"""The zig-zag block schedule: one loop nest, token -> layer -> micro-batch.

Within a block, each layer's weights are loaded once and used by every micro-batch. With
`overlap`, one I/O thread prefetches the next layer's weights while a second loads each
micro-batch's KV cache and stores its new entries, and the main thread computes; without it the
same loop runs every transfer inline. Two threads, because behind a single FIFO one every layer's
first cache load would queue behind the next layer's weights, and that layer's compute would wait
for both. The cache thread is FIFO, so a cache row stored at step i is always written before the
load that reads it at step i + 1 is served.

On a CPU, weights cross the weights thread as read (4-bit packed, fp16 as stored) and are
dequantized or widened on the main thread (transfer.WeightLoad.finish), so that the cores alternate
between converting and computing instead of being oversubscribed; with few rows a micro-batch, the
C kernel multiplies 4-bit weights straight from the packed values instead
(compression.multiply_packed). Who owns which buffer, and when it goes back, is in engine/transfer.py.

What overlap can win on a CPU-only virtual machine depends on where the hypervisor emulates the
disk: if its emulation runs on the compute's cores, a read and a computation barely overlap.
benchmarks/disk_contention.py measures it on the machine at hand (results: docs/benchmarks.md,
"What a disk read costs the compute").
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import compression, ops
from .kv_cache import KVCache
from .formats import Format
from .tiers import TierArray, Tiers
from .transfer import CacheRead, WeightLoad
from .weights import LayerWeights


@dataclass
class Layer:
    kind: str                 # embed | attn | mlp | decoder (attn + mlp) | head
    index: int                # decoder layer index (-1 for embed and head)
    weights: LayerWeights


@dataclass
class MicroBatch:
    """Sequences computed together, with their cache and generation state."""
    rows: list[int]                       # positions in the caller's prompt list
    ids: torch.Tensor                     # (b, s) left-padded prompt
    mask: torch.Tensor                    # (b, s + max_new) 1 for real tokens
    length: int = 0                       # tokens processed so far, the shared prefix included
    prefix_len: int = 0                   # tokens of the shared prefix (their cache is not per sequence)
    feed: torch.Tensor | None = None      # (b, q) tokens to run this step
    caches: dict = field(default_factory=dict)   # decoder index -> KVCache
    tokens: list = field(default_factory=list)   # new token ids per sequence
    done: torch.Tensor | None = None      # (b,) bool
    score_len: int = 1                    # last positions the head scores (1 = next token only)
    last_logits: torch.Tensor | None = None   # (b, vocab)
    scored_logits: torch.Tensor | None = None  # (b, score_len, vocab) when score_len > 1
    step_inputs: dict = field(default_factory=dict)  # positions and mask bias of this step, shared by its layers

    @property
    def size(self) -> int:
        return self.ids.shape[0]


class _Inline:
    """An executor that runs each job at once (overlap off)."""

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait=True):
        pass


def _io_thread(name: str) -> ThreadPoolExecutor:
    """A FIFO worker whose torch ops run on one core, so that it never oversubscribes the compute
    threads' pool."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


@dataclass
class _Whole:
    """Stands for 'the whole micro-batch, no past cache yet' during prefill."""
    n: int
    device: torch.device
    lo: int = 0
    k: None = None
    v: None = None

    @property
    def hi(self) -> int:
        return self.n


class ActStore:
    """Hidden states between layers, held on the activation tier."""

    def __init__(self, tiers: Tiers, tier: str):
        self.tiers, self.tier, self.items = tiers, tier, {}

    def put(self, key, h: torch.Tensor) -> None:
        self.drop(key)
        if self.tier == "disk":
            arr = TierArray(self.tiers, "disk", Format(torch.float32), tuple(h.shape), 1, f"hidden{key}")
            arr.write(0, h.float()[None])
            self.items[key] = arr
        else:
            self.tiers.trackers[self.tier].alloc(h.numel() * h.element_size(), "hidden states")
            self.items[key] = h.to(self.tiers.device(self.tier))

    def get(self, key) -> torch.Tensor:
        item = self.items[key]
        if isinstance(item, TierArray):
            return item.read(0, 1, self.tiers.compute_device, self.tiers.compute_dtype)[0]
        return item.to(self.tiers.compute_device)

    def drop(self, key) -> None:
        item = self.items.pop(key, None)
        if isinstance(item, TierArray):
            item.close()
        elif item is not None:
            self.tiers.trackers[self.tier].free(item.numel() * item.element_size())


class BlockRunner:
    """Runs one block of micro-batches through prefill and decode."""

    def __init__(self, llm, *, sampler, on_tokens, prefix: dict | None = None, on_step=None):
        """Run `llm.layers`. `sampler(logits (b, vocab)) -> ids (b,)` picks each step's tokens and
        `on_tokens(mb, ids)` records them; `on_step()` follows every token step of run()."""
        self.llm, self.layers = llm, llm.layers
        self.prefix = prefix                      # decoder index -> KVCache of the shared prefix
        self.cfg, self.fam, self.tiers, self.policy = llm.config, llm.family, llm.tiers, llm.policy
        self.sampler, self.on_tokens, self.on_step = sampler, on_tokens, on_step
        # (with everything compute-ready on the compute device there is nothing to overlap, and more
        # busy threads on two cores only slow the compute threads down)
        threads = self.policy.overlap and self._moves_data()
        self.io = _io_thread("flexwrangle-weights") if threads else _Inline()         # weight prefetch
        self.cache_io = _io_thread("flexwrangle-cache") if threads else _Inline()     # cache loads and stores
        self.pool = llm.pool
        self._w_next: Future | None = None       # weights_next: a WeightLoad being read on the I/O thread
        self._packed: bool | None = None         # whether the last step multiplied 4-bit weights packed
        self.timings = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}

    def _moves_data(self) -> bool:
        """Whether any weight, cache or activation lives off the compute device or compressed."""
        p = self.policy
        return not (p.w_gpu_percent == p.cache_gpu_percent == p.act_gpu_percent == 100
                    and not p.compress_weight and not p.compress_cache)

    # ---- transfers (run on the I/O threads when overlapping) ---------------------------------------
    def _load_weights(self, j: int, packed: bool) -> WeightLoad:
        return self.layers[j].weights.load(self.pool, packed)

    def _prefetch(self, j: int, packed: bool) -> Future:
        return self.io.submit(self._load_weights, j, packed)

    def _load_cache(self, cache: KVCache, length: int) -> CacheRead:
        return cache.read(length, self.pool)

    # ---- the loop nest --------------------------------------------------------------------------
    def run(self, mbs: list[MicroBatch], max_new_tokens: int, act: ActStore) -> None:
        """Token steps until every sequence stopped or max_new_tokens were generated."""
        try:
            for step in range(max_new_tokens):
                active = [mb for mb in mbs if not bool(mb.done.all())]
                if not active:
                    break
                t0 = time.perf_counter()
                self.run_layers(active, step, act, more_steps=step + 1 < max_new_tokens)
                for mb in active:
                    self.advance(mb, self.sampler(mb.last_logits))
                self.record_step(step, time.perf_counter() - t0)
        finally:
            self.close()

    def run_layers(self, mbs: list[MicroBatch], step: int, act: ActStore, more_steps: bool) -> None:
        """Every layer of this runner over `mbs` for one token step: layer outer, micro-batch inner.

        While layer j computes, the weights thread loads layer j + 1 (wrapping to layer 0 of the next
        step when `more_steps`)."""
        n_layers = len(self.layers)
        wcfg, on_cpu = self.policy.comp_weight_config, self.tiers.compute_device.type == "cpu"
        rows = max(mb.size * mb.feed.shape[1] for mb in mbs)
        defer = compression.multiply_packed(rows, len(mbs), wcfg, on_cpu)            # for every layer
        # the next step decodes one token a sequence (with these micro-batches or fewer, which
        # multiply_packed only favours more), so the wrap-around prefetch loads for that
        defer_next = compression.multiply_packed(max(mb.size for mb in mbs), len(mbs), wcfg, on_cpu)
        if self._packed is not None and self._packed != defer:
            # prefill dequantized whole working copies and decode borrows scratch only (or back, as
            # a pipeline stage's groups interleave): the idle buffers of the last phase go, which at
            # OPT-1.3b's batch 56 is 0.6 GiB of RSS decode never touches
            self.pool.trim()
        self._packed = defer
        if self._w_next is None:
            self._w_next = self._prefetch(0, defer)
        for j in range(n_layers):
            future, self._w_next = self._w_next, None
            weights_now = future.result()
            if weights_now.packed and not defer:   # scratch only, loaded for another step: load whole copies
                weights_now.close()
                weights_now = self._load_weights(j, defer)
            if j + 1 < n_layers or more_steps:                   # prefetch the next layer's weights
                self._w_next = self._prefetch((j + 1) % n_layers, defer if j + 1 < n_layers else defer_next)
            with weights_now:                                    # its buffers go back when the layer is done
                self._run_layer(j, weights_now.finish(defer), mbs, step, act)   # dequantize here, between computes
        if self.tiers.compute_device.type == "cuda":
            torch.cuda.synchronize()

    def advance(self, mb: MicroBatch, next_ids: torch.Tensor) -> None:
        """Feed the sampled tokens (b,) to the next step and record them."""
        mb.length += mb.feed.shape[1]
        mb.feed = next_ids.view(-1, 1).cpu()
        mb.step_inputs = {}
        self.on_tokens(mb, next_ids.cpu())

    def record_step(self, step: int, seconds: float) -> None:
        if step == 0:
            self.timings["prefill_s"] += seconds
        else:
            self.timings["decode_s"] += seconds
            self.timings["decode_steps"] += 1
        if self.on_step is not None:
            self.on_step()

    def close(self) -> None:
        """Wait for pending stores; give back a prefetch the loop did not use."""
        self.io.shutdown(wait=True)
        self.cache_io.shutdown(wait=True)
        if self._w_next is not None:
            self._w_next.result().close()
            self._w_next = None

    def _run_layer(self, j: int, w: dict, mbs: list[MicroBatch], step: int, act: ActStore) -> None:
        layer = self.layers[j]
        is_attn = layer.kind in ("attn", "decoder")
        needs_cache = is_attn and step > 0
        own = lambda mb: mb.length - mb.prefix_len          # rows of a micro-batch's own cache
        prefix_next = (self.cache_io.submit(self._load_cache, self.prefix[layer.index], mbs[0].prefix_len)
                       if is_attn and self.prefix else None)
        cache_next = (self.cache_io.submit(self._load_cache, mbs[0].caches[layer.index], own(mbs[0]))
                      if needs_cache else None)
        with prefix_next.result() if prefix_next else CacheRead.nothing() as prefix:   # shared by every micro-batch
            for idx, mb in enumerate(mbs):
                past = cache_next.result() if needs_cache else CacheRead.nothing()
                if needs_cache and idx + 1 < len(mbs):           # prefetch the next micro-batch's cache
                    nxt = mbs[idx + 1]
                    cache_next = self.cache_io.submit(self._load_cache, nxt.caches[layer.index], own(nxt))
                key = id(mb)
                h = act.get(key) if layer.kind != "embed" else None
                with past:                                        # its buffers go back once attended
                    h = self._compute(layer, w, mb, h, past.parts, prefix.parts[0] if prefix.parts else None)
                    if layer.kind == "head":
                        act.drop(key)
                    else:
                        act.put(key, h)

    def _compute(self, layer: Layer, w: dict, mb: MicroBatch, h, past, prefix):
        cfg, fam = self.cfg, self.fam
        q_len = mb.feed.shape[1]
        total = mb.length + q_len
        if "positions" not in mb.step_inputs:                    # the same for every layer of this step
            mb.step_inputs["positions"] = ops.position_ids(mb.mask[:, :total])[:, -q_len:].to(self.tiers.compute_device)
        positions = mb.step_inputs["positions"]
        if layer.kind == "embed":
            return fam.embed(w, mb.feed.to(self.tiers.compute_device), positions, cfg)
        if layer.kind == "head":
            if mb.score_len > 1:
                mb.scored_logits = fam.head(w, h[:, -mb.score_len:], cfg).float()   # (b, L, vocab)
                mb.last_logits = mb.scored_logits[:, -1]
            else:
                mb.last_logits = fam.head(w, h[:, -1], cfg).float()              # (b, vocab)
            return None
        if layer.kind in ("attn", "decoder"):
            aw = {k[5:]: v for k, v in w.items() if k.startswith("attn.")} if layer.kind == "decoder" else w
            h = self._attention(layer, aw, mb, h, positions, past, prefix, total)
        if layer.kind in ("mlp", "decoder"):
            mw = {k[4:]: v for k, v in w.items() if k.startswith("mlp.")} if layer.kind == "decoder" else w
            h = fam.mlp(mw, h, cfg)
        return h

    def _attention(self, layer, w, mb: MicroBatch, h, positions, past, prefix, total):
        """Keys are [shared prefix | this sequence's past | new tokens]; mask_bias covers all of them."""
        cfg, fam = self.cfg, self.fam
        q, k, v = fam.attn_qkv(w, h, positions, cfg)              # q (b, nh, s, d); k, v (b, nkv, s, d)
        q_len = q.shape[2]
        if "bias" not in mb.step_inputs:
            mb.step_inputs["bias"] = ops.attention_mask_bias(mb.mask[:, :total].to(q.device), q_len, q.dtype)
        bias = mb.step_inputs["bias"]                                                     # (b, 1, s, t)
        cache = mb.caches[layer.index]
        parts = past if past is not None else [_Whole(q.shape[0], q.device)]
        o = torch.empty_like(q) if len(parts) > 1 else None
        for p in parts:                                           # per cache part, where it lives
            dev, lo, hi = p.device, p.lo, p.hi
            segments = []
            if prefix is not None:                                # shared by every sequence: batch 1
                segments.append((prefix.k.to(dev), prefix.v.to(dev)))
            if p.k is not None:
                segments.append((p.k, p.v))
            segments.append((k[lo:hi].to(dev), v[lo:hi].to(dev)))   # new entries as computed, unrounded
            out = ops.attend_any(q[lo:hi].to(dev), segments, bias[lo:hi].to(dev), fam.ATTN_SCALE)
            if o is None:
                o = out.to(q.device, q.dtype)
            else:
                o[lo:hi] = out.to(q.device, q.dtype)
        self.cache_io.submit(cache.write, mb.length - mb.prefix_len, k, v)      # store the new entries
        return fam.attn_out(w, h, o, cfg)

