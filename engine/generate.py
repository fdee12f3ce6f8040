"""The LLM object: owns the config, the weight store and the tokenizer; runs generate()."""
from __future__ import annotations

import math
import resource
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from . import int8
from .blocks import Decoding, Workload, run_workload
from .config import ModelConfig
from .kv_cache import KVCache
from .models import family as model_family
from .placement import Precision, layer_specs, plan_cache, preflight_need
from .policy import TIERS, Policy
from .prompts import check_prompts, cut_at_stop, cut_text, encode_text, stop_sets
from .registry import open_model
from .schedule import ActStore, BlockRunner, Layer, MicroBatch
from .tiers import BufferPool, MemoryBudgetError, Tiers, fmt_bytes
from .weights import place_layer, resolve_names, unmapped_on_free

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


class LLM:
    """A decoder-only model whose weights, KV cache and activations are placed by a Policy."""

    def __init__(self, config: ModelConfig, source, policy: Policy, tiers: Tiers, storage: torch.dtype,
                 tokenizer=None, progress: bool = True, stage: tuple[int, int] | None = None):
        self.config, self.policy, self.tiers, self.storage = config, policy, tiers, storage
        self.stage = stage                                 # (rank, world) of a pipeline; None = all layers
        self.family = model_family(config.family)
        self.tokenizer = tokenizer
        self.progress = progress
        self._bar = None
        self.last_stats: dict = {}
        self.pool = BufferPool(tiers.trackers["gpu"])     # working buffers on the compute device
        self.layers = self._place_weights(source)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, policy: Policy | str | dict | None = None,
                        offload_dir: str | Path | None = None, dummy: bool = False,
                        dtype: str | torch.dtype = "float16", gpu_mem=None, cpu_mem=None, disk_mem=None,
                        progress: bool = True, workload: tuple[int, int] | None = None,
                        stage: tuple[int, int] | None = None) -> "LLM":
        """Load a local checkpoint (or a published OPT shape with dummy=True) and place it by `policy`.

        `dtype` is the storage precision of weights and KV cache on every tier (compute runs in
        float32 on CPU, float16 on CUDA). `gpu_mem`/`cpu_mem`/`disk_mem` cap each tier ('2GB').
        `policy="auto"` searches a policy for `workload` = (prompt_len, gen_len), default (512, 32),
        choosing 4-bit weights and cache where the cost model says they pay (never int8 products);
        `policy={"auto": True, ...}` searches placement and batch only, at the precision the dict
        names (`compress_weight`, `compress_cache`, `int8_matmul`; absent = off): see auto_precision.
        `stage=(rank, world)` holds only that pipeline stage's layers (see engine.distributed).
        """
        storage = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if storage not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype!r}: use float16, bfloat16 or float32")
        source, tokenizer, config = open_model(path_or_name, dummy)
        tiers = Tiers(offload_dir, gpu_mem, cpu_mem, disk_mem)
        if isinstance(policy, str) and policy == "auto" or isinstance(policy, dict) and policy.get("auto"):
            from .policy_search import auto_policy
            prompt_len, gen_len = workload or (512, 32)
            policy = auto_policy(config, tiers, storage=storage, prompt_len=prompt_len, gen_len=gen_len,
                                 **auto_precision(policy))
        elif isinstance(policy, dict):
            policy = Policy.from_dict(policy)
        elif policy is None:
            policy = Policy()
        elif not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, a dict of its fields, 'auto' or None; got {policy!r}")
        return cls(config, source, policy, tiers, storage, tokenizer, progress, stage)

    def _layer_plan(self) -> list[tuple[str, int]]:
        """(kind, decoder index) of every layer this object runs, in order."""
        lo, hi = stage_layers(self.config.num_layers, *(self.stage or (0, 1)))
        first, last = self.stage is None or self.stage[0] == 0, self.stage is None or self.stage[0] == self.stage[1] - 1
        plan = [("embed", -1)] if first else []
        for i in range(lo, hi):
            plan += [("attn", i), ("mlp", i)] if self.policy.sep_layer else [("decoder", i)]
        return plan + ([("head", -1)] if last else [])

    @property
    def decoder_indices(self) -> list[int]:
        return sorted({layer.index for layer in self.layers if layer.index >= 0})

    def _place_weights(self, source) -> list[Layer]:
        from tqdm.auto import tqdm
        layers = []
        plan = self._layer_plan()
        placed = {}                                # checkpoint name -> array: a tied head shares the embedding
        with unmapped_on_free():
            for kind, i in tqdm(plan, desc=f"placing {self.config.name} weights", unit="layer",
                                disable=not self.progress, leave=False):
                layers.append(self._place_layer(source, kind, i, placed))
        return layers

    def _place_layer(self, source, kind: str, i: int, placed: dict) -> Layer:
        specs = resolve_names(layer_specs(self.config, kind), i)
        label = f"{kind}{i if i >= 0 else ''}"
        return Layer(kind, i, place_layer(self.tiers, self.policy, source, specs, label, self.storage, placed,
                                          matmul=i >= 0))

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop=None, seed: int | None = None,
                 ignore_eos: bool = False, bucket: bool = True, share_prefix: bool = True) -> list[list[int]]:
        """New token ids for each prompt, each cut at its own stop (the stop token kept).

        `stop` is a token id, a string, or a list of strings/ids; end-of-sequence always stops
        unless `ignore_eos`. Prompts are grouped into blocks of `policy.block_size` sequences
        (sorted by length when `bucket`); results come back in input order. With `share_prefix`,
        the longest common token prefix of the batch is computed once and its KV cache reused.
        """
        prompts = check_prompts(prompt_ids, max_new_tokens, self.config)
        if max_new_tokens == 0 or not prompts:
            return [[] for _ in prompts]
        decoding = Decoding.build(self.config, self.tokenizer, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, stop=stop, seed=seed, ignore_eos=ignore_eos)
        work = Workload.plan(prompts, max_new=max_new_tokens, bucket=bucket, share_prefix=share_prefix)
        results: list[list[int]] = [[] for _ in prompts]
        for mb in self._run(work, decoding):
            for r, toks in zip(mb.rows, mb.tokens):
                results[r] = cut_at_stop(self.tokenizer, toks, decoding.stop_strings)
        self.last_stats["new_tokens"] = sum(len(r) for r in results)
        return results

    def logits(self, prompt_ids, share_prefix: bool = True) -> torch.Tensor:
        """Last-position logits (b, vocab) of each prompt, in float32 (one prefill pass)."""
        prompts = check_prompts(prompt_ids, 1, self.config)
        out = torch.empty(len(prompts), self.config.vocab_size)
        for mb in self._run(Workload.plan(prompts, max_new=1, share_prefix=share_prefix), Decoding()):
            out[mb.rows] = mb.last_logits.cpu()
        return out

    def score_choices(self, prompts, choices, chat: bool = False, share_prefix: bool = True) -> list[list[float]]:
        """Summed log-probability of each choice as the continuation of each prompt.

        `prompts` are strings or token-id lists; `choices` a list of strings or token-id lists shared
        by all prompts (or one such list per prompt). When every choice is one token, one prefill
        pass over the prompts scores them all; otherwise each prompt + choice is one sequence and
        one pass scores every choice token.
        """
        ids = [self.encode(p, chat=chat) if isinstance(p, str) else list(p) for p in prompts]
        per_prompt = choices if choices and isinstance(choices[0], (list, tuple)) and choices[0] \
            and not isinstance(choices[0][0], int) else [choices] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(per_prompt)} choice lists")
        tok_choices = [[self._choice_ids(c) for c in cs] for cs in per_prompt]
        if all(len(c) == 1 for cs in tok_choices for c in cs):
            logp = torch.log_softmax(self.logits(ids, share_prefix=share_prefix), dim=-1)     # (n, vocab)
            return [[float(logp[i, c[0]]) for c in cs] for i, cs in enumerate(tok_choices)]
        seqs = [p + c for p, cs in zip(ids, tok_choices) for c in cs]
        owners = [(i, j) for i, cs in enumerate(tok_choices) for j in range(len(cs))]
        score_len = max(len(c) for cs in tok_choices for c in cs) + 1
        work = Workload.plan(check_prompts(seqs, 1, self.config), max_new=1, share_prefix=share_prefix,
                             score_len=score_len)
        scores = [[0.0] * len(cs) for cs in tok_choices]
        for mb in self._run(work, Decoding()):
            logp = torch.log_softmax(mb.scored_logits, dim=-1)                                # (b, L, vocab)
            for row, r in enumerate(mb.rows):
                i, j = owners[r]
                c = tok_choices[i][j]
                cols = range(score_len - 1 - len(c), score_len - 1)     # positions that predict c
                scores[i][j] = float(sum(logp[row, col, t] for col, t in zip(cols, c)))
        return scores

    def _choice_ids(self, choice) -> list[int]:
        if isinstance(choice, str):
            ids = self.require_tokenizer()(choice, add_special_tokens=False)["input_ids"]
        else:
            ids = list(choice)
        if not ids:
            raise ValueError(f"choice {choice!r} is empty; every choice needs at least one token")
        return ids

    def _run(self, work: Workload, decoding: Decoding) -> Iterator[MicroBatch]:
        """Every block of `work`, the shared prefix first; yields finished micro-batches. Fills `last_stats`."""
        stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "prefix_len": work.prefix_len,
                 "prompt_tokens": sum(len(p) for p in work.prompts),
                 "prefill_positions": work.prefix_len}     # the prefix once, then every block, padding included
        self.check_memory(work)
        self._progress_start(len(work.prompts), work.max_new)
        try:
            yield from run_workload(work, self.policy.block_size, decoding, partial(self.run_blocks, stats=stats))
        finally:
            self._progress_close()
            int8.forget()                          # the last input int8 products quantized
            stats["peak_bytes"] = self.tiers.peaks()
            stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.last_stats = stats

    def generate_text(self, prompts: list[str], max_new_tokens: int = 32, chat: bool = False,
                      stop=None, **kwargs) -> list[str]:
        """Text in, new text out (cut before the first stop string), through the model's tokenizer."""
        tok = self.require_tokenizer()
        if isinstance(prompts, str):
            raise TypeError("generate_text takes a list of strings; wrap a single prompt in a list")
        ids = [self.encode(p, chat=chat) for p in prompts]
        new = self.generate(ids, max_new_tokens=max_new_tokens, stop=stop, **kwargs)
        texts = [tok.decode(t, skip_special_tokens=True) for t in new]
        _, stop_strings = stop_sets(stop, True, self.config, self.tokenizer)
        return [cut_text(t, stop_strings) for t in texts]

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text` (in the chat template with `chat`); special-token strings in it stay text."""
        tok = self.require_tokenizer()
        if chat and not getattr(tok, "chat_template", None):
            raise ValueError(f"{self.config.name} has no chat template; call with chat=False")
        return encode_text(tok, text, chat)

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    # ---- blocks (PipelineLLM composes the same parts) ----------------------------------------------
    def run_blocks(self, work: Workload, blocks: list[list[int]], decoding: Decoding, *,
                   prefix: dict | None = None, prefix_pass: bool = False,
                   stats: dict | None = None) -> Iterator[MicroBatch]:
        """The blocks of `work` one after the other (blocks.RunBlocks); their timings go to `stats`."""
        stats = {} if stats is None else stats
        for rows in blocks:
            t0 = time.perf_counter()
            mbs = self.run_block(work, rows, decoding, prefix=prefix, keep_cache=prefix_pass,
                                 timings=None if prefix_pass else stats)
            if prefix_pass:             # the shared prefix's prefill, its set-up included
                stats["prefill_s"] = stats.get("prefill_s", 0) + time.perf_counter() - t0
            else:
                stats["prefill_positions"] = stats.get("prefill_positions", 0) + sum(mb.ids.numel() for mb in mbs)
            yield from mbs

    def run_block(self, work: Workload, rows: list[int], decoding: Decoding, *, prefix: dict | None = None,
                  keep_cache: bool = False, timings: dict | None = None) -> list[MicroBatch]:
        """Prefill and decode the block `rows` of `work`; its micro-batches, with their tokens.

        `prefix`: the shared prefix's KV cache (decoder index -> KVCache). The block's caches are
        closed unless `keep_cache`. `timings` gains prefill_s, decode_s and decode_steps."""
        mbs = work.microbatches(rows, self.config, self.policy)
        act = ActStore(self.tiers, self.policy.act_tier)
        try:
            self.attach_caches(mbs, max_new=work.max_new)
            runner = BlockRunner(self, sampler=decoding.sampler, on_tokens=decoding.record, prefix=prefix,
                                 on_step=self._progress_update)
            runner.run(mbs, work.max_new, act)
            for key, value in runner.timings.items():
                if timings is not None:
                    timings[key] = timings.get(key, 0) + value
        finally:
            for mb in mbs:
                if not keep_cache:
                    for c in mb.caches.values():
                        c.close()
                act.drop(id(mb))
        return mbs

    def attach_caches(self, mbs: list[MicroBatch], *, max_new: int, first: int = 0) -> None:
        """A KV cache per (local decoder layer, micro-batch) for `max_new` more tokens; on failure
        none stay allocated. `first` numbers the micro-batches in cache labels."""
        cfg = self.config
        try:
            for k, mb in enumerate(mbs, first):
                for i in self.decoder_indices:
                    mb.caches[i] = KVCache(self.tiers, self.policy, mb.size, cfg.num_kv_heads, cfg.head_dim,
                                           mb.ids.shape[1] + max_new, self.storage, f"kv{i}.mb{k}")
        except BaseException:
            for mb in mbs:
                for c in mb.caches.values():
                    c.close()
                mb.caches.clear()
            raise

    def check_memory(self, work: Workload) -> None:
        """Raise MemoryBudgetError before any work when the largest block of `work`, its KV cache and
        buffers, cannot fit a tier."""
        cfg, pol = self.config, self.policy
        prompt_len, max_len = work.longest, work.longest + work.max_new
        n_seqs = min(len(work.prompts), pol.block_size)
        sizes = [min(pol.gpu_batch_size, n_seqs - lo) for lo in range(0, n_seqs, pol.gpu_batch_size)]
        precision = Precision.of(pol, self.tiers.compute_device.type, self.storage)
        parts = lambda n: plan_cache(n, cfg.num_kv_heads, cfg.head_dim, pol.percents("cache"), precision)
        rows, act = dict.fromkeys(TIERS, 0), dict.fromkeys(TIERS, 0)
        for part in (part for size in sizes for part in parts(size)):
            rows[part.tier] += part.stored_row_bytes
        act[pol.act_tier] = n_seqs * prompt_len * cfg.hidden_size * precision.compute_dtype.itemsize
        need = preflight_need(rows, max_len, len(self.decoder_indices), act,
                              max(layer.weights.working_bytes() for layer in self.layers),
                              sum(part.copy_bytes(max_len) for part in parts(sizes[0])))
        for tier, n in need.items():
            tr = self.tiers.trackers[tier]
            held = tr.current - (self.pool.idle_bytes if tier == "gpu" else 0)   # idle buffers can be freed
            if held + n > tr.capacity:
                raise MemoryBudgetError(
                    f"this policy does not fit: the {tier} tier needs {fmt_bytes(held + n)} "
                    f"({fmt_bytes(held)} of weights + {fmt_bytes(n)} of KV cache, hidden states and "
                    f"working buffers) but has {fmt_bytes(tr.capacity)}, over by "
                    f"{fmt_bytes(held + n - tr.capacity)}: lower gpu_batch_size "
                    f"({pol.gpu_batch_size}) or num_gpu_batches ({pol.num_gpu_batches}), move cache to "
                    f"another tier, or raise the {tier} budget")

    def require_tokenizer(self):
        """The tokenizer; a ValueError that says why when the model has none."""
        if self.tokenizer is None:
            raise ValueError(f"{self.config.name} has no tokenizer (dummy weights or a checkpoint without "
                             "tokenizer files); pass token ids to generate()")
        return self.tokenizer

    # ---- progress and reports --------------------------------------------------------------------
    def _progress_start(self, n_prompts: int, max_new: int):
        if not self.progress:
            return
        from tqdm.auto import tqdm
        blocks = math.ceil(n_prompts / self.policy.block_size)
        self._bar = tqdm(total=blocks * max_new, desc="generating", unit="step", leave=False)

    def _progress_update(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def _progress_close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def memory_report(self) -> dict:
        """Bytes held now and at the peak on each tier, and the process peak RSS."""
        return {"current": {n: t.current for n, t in self.tiers.trackers.items()},
                "peak": self.tiers.peaks(),
                "capacity": {n: t.capacity for n, t in self.tiers.trackers.items()},
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights held on each tier (a tied tensor shared by two layers counted once)."""
        arrays = {id(a): a for layer in self.layers for a in layer.weights.arrays.values()}.values()
        return {t: sum(a.nbytes for a in arrays if a.tier == t) for t in ("gpu", "cpu", "disk")}

    def close(self) -> None:
        """Free every tier's bytes and delete offload files."""
        for layer in self.layers:
            layer.weights.close()
        self.layers = []
        self.pool.trim()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stage_layers(num_layers: int, rank: int, world: int) -> tuple[int, int]:
    """Decoder layers [lo, hi) of pipeline stage `rank` out of `world`: contiguous, sizes within one."""
    if not 0 <= rank < world:
        raise ValueError(f"stage rank {rank} is outside a world of {world}")
    if world > num_layers:
        raise ValueError(f"{world} pipeline stages for {num_layers} decoder layers: use at most {num_layers}")
    base, extra = divmod(num_layers, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


PRECISION_FIELDS = ("compress_weight", "compress_cache", "int8_matmul")


def auto_precision(policy: str | dict) -> dict:
    """The precision an automatic policy search keeps, as search_policy arguments.

    "auto" lets the search choose 4-bit weights and cache (None), as FlexGen's does, and never int8
    products. A dict {"auto": True, ...} fixes each to what it names (absent = False), or leaves it
    to the search where it says None: with every field fixed, answers depend only on the dict, not on
    the machine's budget, so callers that key results by their parameters stay exact (the flows add
    the chosen precision to the run key otherwise)."""
    if not isinstance(policy, dict):
        return {"compress_weight": None, "compress_cache": None, "int8_matmul": False}
    unknown = set(policy) - {"auto", *PRECISION_FIELDS}
    if unknown:
        raise ValueError(f"an automatic policy takes only {['auto', *PRECISION_FIELDS]}, got {sorted(unknown)}: "
                         "the search chooses the placement and batch itself")
    return {f: None if policy.get(f, False) is None else bool(policy.get(f, False)) for f in PRECISION_FIELDS}
