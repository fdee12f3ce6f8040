"""Pipeline parallelism over torch.distributed: each rank holds one contiguous stage of layers.

    torchrun --nproc-per-node 2 -m engine.bench --model opt-125m --dummy --gen-len 8

Rank 0 holds the embedding, the last rank the head, and the decoder layers are split
contiguously (`stage_layers`). Each rank places and offloads its own layers with its own
`Policy` (the batch shape must agree). Prompts are cut into the same blocks as the
single-process engine; a *group* is a block, or a slice of a block's micro-batches when there
are fewer blocks than groups in flight. Up to `num_groups` (>= world size) groups are in flight,
processed round-robin, so while rank 1 computes group 0, rank 0 computes group 1:

    turn (group g, step s), the same order on every rank:
      get the tokens of (g, s-1) from the last rank; advance; stop here if g is done
      rank 0 embeds, others receive g's hidden states from rank - 1   (irecv)
      run_layers: this stage's layers over g's micro-batches (zig-zag, prefetch as usual)
      send the hidden states to rank + 1                               (isend, waited later)
      or, on the last rank, sample and send the tokens to every rank   (isend, waited later)

Every rank advances every micro-batch with the same tokens, so stop/done state is identical
everywhere and every rank returns the same results. Greedy decoding gives exactly the tokens of
the single-process run (each micro-batch's computation is the same); sampling is reproducible
with a seed but draws in a different order than the single-process run.
"""
from __future__ import annotations

import os
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist

from .blocks import Decoding, Workload, run_workload
from .generate import LLM
from .prompts import check_prompts, cut_at_stop, cut_text, stop_sets
from .schedule import ActStore, BlockRunner, MicroBatch

TAG_HIDDEN, TAG_TOKENS = 1, 2
DECODING_OPTIONS = ("do_sample", "temperature", "top_p", "stop", "seed", "ignore_eos")   # generate()'s, for Decoding


class PipelineError(RuntimeError):
    """Another rank of the pipeline failed (its message is included)."""


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (env://) unless already joined.

    gloo on CPU, NCCL when CUDA is present; returns (rank, world size)."""
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend, **kw)
    return dist.get_rank(), dist.get_world_size()


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank failed, so that no rank waits for a peer that gave up."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, text in enumerate(errors):
        if text:
            raise PipelineError(f"rank {rank} failed: {text}")


@dataclass
class _Group:
    """Micro-batches that move through the pipeline together."""
    mbs: list[MicroBatch]
    step: int = 0                                  # next token step to compute
    active: list = field(default_factory=list)     # micro-batches computed at the last step
    next_ids: torch.Tensor | None = None           # last rank: tokens sampled at the last step
    sends: list = field(default_factory=list)      # (work, tensor) of isends not yet waited


class PipelineLLM:
    """One pipeline stage of a model; call generate() on every rank with the same arguments
    (rank 0's prompts and options are the ones used; others may pass None)."""

    def __init__(self, llm: LLM, num_groups: int | None = None, owns_process_group: bool = False):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if llm.stage != (self.rank, self.world):
            raise ValueError(f"this rank is ({self.rank}, {self.world}) but the LLM holds stage {llm.stage}: "
                             f"build it with LLM.from_pretrained(..., stage=({self.rank}, {self.world}))")
        self.llm = llm
        self.num_groups = max(self.world, num_groups or self.world)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world - 1
        self.backend = dist.get_backend()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.wire_dtype = torch.float16 if self.backend == "nccl" else torch.float32
        self._owns_pg = owns_process_group
        self.last_stats: dict = {}
        shape = (llm.config.num_layers, llm.config.hidden_size, llm.config.vocab_size,
                 llm.policy.gpu_batch_size, llm.policy.num_gpu_batches)
        shapes: list = [None] * self.world
        dist.all_gather_object(shapes, shape)
        if any(s != shape for s in shapes):
            raise ValueError("every rank needs the same model and batch shape (layers, hidden, vocab, "
                             f"gpu_batch_size, num_gpu_batches); got {shapes}")

    @classmethod
    def from_pretrained(cls, path_or_name, policy=None, num_groups: int | None = None,
                        backend: str | None = None, **kwargs) -> "PipelineLLM":
        """Join the process group (torchrun's env) and load this rank's stage: LLM.from_pretrained
        arguments, each rank with its own `policy` and budgets; a progress bar only on rank 0."""
        owns = not dist.is_initialized()
        rank, world = init_distributed(backend)
        kwargs["progress"] = kwargs.get("progress", True) and rank == 0
        llm, error = None, None
        try:
            llm = LLM.from_pretrained(path_or_name, policy=policy, stage=(rank, world), **kwargs)
        except Exception as exc:       # every rank must hear of it, or the others wait forever
            error = exc
        agree(error)
        return cls(llm, num_groups, owns_process_group=owns)

    # the LLM's face, for callers written against it (engine.bench, flows)
    config = property(lambda self: self.llm.config)
    policy = property(lambda self: self.llm.policy)
    tokenizer = property(lambda self: self.llm.tokenizer)
    max_context = property(lambda self: self.llm.max_context)
    blocks_in_flight = property(lambda self: self.num_groups)

    def weight_bytes(self) -> dict[str, int]:
        return self.llm.weight_bytes()

    def memory_report(self) -> dict:
        return self.llm.memory_report()

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return self.llm.encode(text, chat=chat)

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop=None, seed: int | None = None,
                 ignore_eos: bool = False, bucket: bool = True, share_prefix: bool = True) -> list[list[int]]:
        """LLM.generate across the pipeline; every rank returns the results, in input order."""
        opts = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    stop=stop, seed=seed, ignore_eos=ignore_eos, bucket=bucket, share_prefix=share_prefix)
        return self._generate(lambda: prompt_ids, opts)

    def generate_text(self, prompts: list[str] | None = None, max_new_tokens: int = 32, chat: bool = False,
                      stop=None, **kwargs) -> list[str]:
        """Text in (on rank 0), new text out (on every rank), cut before the first stop string."""
        opts = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, stop=stop,
                    seed=None, ignore_eos=False, bucket=True, share_prefix=True)
        unknown = set(kwargs) - set(opts)
        if unknown:
            raise TypeError(f"generate_text() got unexpected keyword arguments {sorted(unknown)}")

        def encode():
            if isinstance(prompts, str):
                raise TypeError("generate_text takes a list of strings; wrap a single prompt in a list")
            return [self.llm.encode(p, chat=chat) for p in prompts]
        new = self._generate(encode, opts | kwargs)
        tok = self.llm.require_tokenizer()
        _, stop_strings = stop_sets(stop, True, self.llm.config, self.llm.tokenizer)
        return [cut_text(tok.decode(t, skip_special_tokens=True), stop_strings) for t in new]

    def _generate(self, make_prompts, opts: dict) -> list[list[int]]:
        prompts, opts = self._broadcast_call(make_prompts, opts)
        if opts["max_new_tokens"] == 0 or not prompts:
            return [[] for _ in prompts]
        llm = self.llm
        decoding = Decoding.build(llm.config, llm.tokenizer, **{k: opts[k] for k in DECODING_OPTIONS})
        work = Workload.plan(prompts, max_new=opts["max_new_tokens"], bucket=opts["bucket"],
                             share_prefix=opts["share_prefix"])
        error = None
        try:
            llm.check_memory(work)
        except Exception as exc:
            error = exc
        agree(error)

        stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "prefix_len": work.prefix_len,
                 "prompt_tokens": sum(len(p) for p in prompts), "busy_s": 0.0, "turns": 0}
        self._t0, self._first_wave_done, self._mb_counter = time.perf_counter(), None, 0
        self._bar = self._progress(len(prompts), work.max_new)
        act = ActStore(llm.tiers, llm.policy.act_tier)
        results = [[] for _ in prompts]
        try:
            run = partial(self._run_groups, act=act, stats=stats)
            for mb in run_workload(work, llm.policy.block_size, decoding, run):
                for r, toks in zip(mb.rows, mb.tokens):
                    results[r] = cut_at_stop(llm.tokenizer, toks, decoding.stop_strings)
        finally:
            if self._bar is not None:
                self._bar.close()
        total = time.perf_counter() - self._t0
        stats["prefill_s"] = self._first_wave_done or total
        stats["decode_s"] = total - stats["prefill_s"]
        stats["total_s"] = total
        stats["new_tokens"] = sum(len(r) for r in results)
        stats["peak_bytes"] = llm.tiers.peaks()
        stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        per_rank: list = [None] * self.world
        dist.all_gather_object(per_rank, {k: stats[k] for k in ("busy_s", "peak_bytes", "peak_rss_bytes")})
        stats["ranks"] = per_rank
        self.last_stats = stats
        return results

    def _broadcast_call(self, make_prompts, opts) -> tuple[list[list[int]], dict]:
        """Rank 0 makes and checks the prompts and options and sends them to every rank (or the error)."""
        payload: list = [None]
        error = None
        if self.is_first:
            try:
                prompts = check_prompts(make_prompts(), opts["max_new_tokens"], self.llm.config)
                stop_sets(opts["stop"], opts["ignore_eos"], self.llm.config, self.llm.tokenizer)
                payload = [(prompts, opts)]
            except Exception as exc:
                error, payload = exc, [f"{type(exc).__name__}: {exc}"]
        dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        if isinstance(payload[0], str):
            raise PipelineError(f"rank 0 rejected the call: {payload[0]}")
        return payload[0]

    # ---- the pipeline ----------------------------------------------------------------------------
    def _run_groups(self, work: Workload, blocks: list[list[int]], decoding: Decoding, *, prefix: dict | None,
                    prefix_pass: bool, act: ActStore, stats: dict) -> Iterator[MicroBatch]:
        """The blocks of `work` through the pipeline as groups (blocks.RunBlocks). The shared
        prefix's pass keeps its caches and does not count towards the prefill time."""
        runner = BlockRunner(self.llm, sampler=decoding.sampler, on_tokens=decoding.record, prefix=prefix)
        try:
            for g in self._pipeline(self._groups(work, blocks), work.max_new, runner, decoding.sampler, act, stats,
                                    keep_cache=prefix_pass, timed=not prefix_pass):
                yield from g.mbs
        finally:
            runner.close()

    def _groups(self, work: Workload, blocks: list[list[int]]) -> Iterator[list[MicroBatch]]:
        """Micro-batch groups in order: whole blocks, or block slices when blocks are fewer than groups."""
        parts = -(-self.num_groups // len(blocks))
        for rows in blocks:
            mbs = work.microbatches(rows, self.llm.config, self.llm.policy)
            k = min(parts, len(mbs))
            cuts = [round(i * len(mbs) / k) for i in range(k + 1)]
            for lo, hi in zip(cuts, cuts[1:]):
                yield mbs[lo:hi]

    def _pipeline(self, groups, max_new, runner, sampler, act, stats, keep_cache=False, timed=True):
        """Turns over up to num_groups live groups, round-robin; yields each group once it is done.

        `timed`: note when every group of the first wave has its first token (the prefill time)."""
        live: deque[_Group] = deque()
        pending, more_groups, first_wave = iter(groups), True, None
        unfinished: list[_Group] = []
        try:
            while True:
                while more_groups and len(live) < self.num_groups:
                    mbs = next(pending, None)
                    if mbs is None:
                        more_groups = False
                        break
                    g = _Group(mbs)
                    unfinished.append(g)
                    self.llm.attach_caches(mbs, max_new=max_new, first=self._mb_counter)
                    self._mb_counter += len(mbs)
                    live.append(g)
                if first_wave is None:
                    first_wave = set(map(id, live)) if timed else set()
                if not live:
                    return
                g = live.popleft()
                if g.step > 0:
                    ids = self._tokens(g)
                    for mb, t in zip(g.active, ids.split([mb.size for mb in g.active])):
                        runner.advance(mb, t)
                    if g.step == 1 and id(g) in first_wave:
                        first_wave.discard(id(g))
                        if not first_wave:
                            self._first_wave_done = time.perf_counter() - self._t0
                g.active = [mb for mb in g.mbs if not bool(mb.done.all())]
                if g.step == max_new or not g.active:
                    self._wait_sends(g)
                    unfinished.remove(g)
                    if not keep_cache:
                        self._close_caches(g)
                    yield g
                    continue
                more = bool(live) or more_groups or g.step + 1 < max_new
                self._turn(g, runner, sampler, act, more, stats)
                g.step += 1
                live.append(g)
        finally:
            for g in unfinished:            # an error midway: free what the started groups hold
                self._close_caches(g)
                for mb in g.mbs:
                    act.drop(id(mb))

    def _turn(self, g: _Group, runner: BlockRunner, sampler, act: ActStore, more_steps: bool, stats) -> None:
        """One token step of one group on this stage: receive, compute, send."""
        sizes = [mb.size for mb in g.active]
        if not self.is_first:
            q = g.active[0].feed.shape[1]
            buf = torch.empty((sum(sizes), q, self.llm.config.hidden_size), dtype=self.wire_dtype,
                              device=self.comm_device)
            dist.irecv(buf, src=self.rank - 1, tag=TAG_HIDDEN).wait()
            for mb, h in zip(g.active, buf.split(sizes)):
                act.put(id(mb), h.to(self.llm.tiers.compute_device, self.llm.tiers.compute_dtype))
        t0 = time.perf_counter()
        runner.run_layers(g.active, g.step, act, more_steps)
        if not self.is_last:
            h = torch.cat([act.get(id(mb)) for mb in g.active]).to(self.comm_device, self.wire_dtype)
            for mb in g.active:
                act.drop(id(mb))
            self._send(g, h.contiguous(), [self.rank + 1], TAG_HIDDEN)
        else:
            g.next_ids = torch.cat([sampler(mb.last_logits).view(-1) for mb in g.active]).cpu()
            self._send(g, g.next_ids.to(self.comm_device), range(self.world - 1), TAG_TOKENS)
        stats["busy_s"] += time.perf_counter() - t0
        stats["turns"] += 1
        stats["decode_steps"] += g.step > 0
        if self._bar is not None:
            self._bar.update(1)

    def _tokens(self, g: _Group) -> torch.Tensor:
        """Tokens sampled at g's last step: the last rank has them; the others receive them."""
        if self.is_last:
            return g.next_ids
        buf = torch.empty(sum(mb.size for mb in g.active), dtype=torch.long, device=self.comm_device)
        dist.irecv(buf, src=self.world - 1, tag=TAG_TOKENS).wait()
        return buf.cpu()

    def _send(self, g: _Group, tensor: torch.Tensor, dsts, tag: int) -> None:
        self._wait_sends(g)            # the group's previous sends: their receivers are a turn behind at most
        g.sends = [(dist.isend(tensor, dst, tag=tag), tensor) for dst in dsts]

    @staticmethod
    def _wait_sends(g: _Group) -> None:
        for work, _ in g.sends:
            work.wait()
        g.sends = []

    @staticmethod
    def _close_caches(g: _Group) -> None:
        for mb in g.mbs:
            for c in mb.caches.values():
                c.close()
            mb.caches.clear()

    def _progress(self, n_prompts: int, max_new: int):
        if not (self.is_first and self.llm.progress):
            return None
        from tqdm.auto import tqdm
        pol = self.llm.policy
        blocks = [min(pol.block_size, n_prompts - lo) for lo in range(0, n_prompts, pol.block_size)]
        parts = -(-self.num_groups // len(blocks))
        n_groups = sum(min(parts, -(-b // pol.gpu_batch_size)) for b in blocks)
        return tqdm(total=n_groups * max_new, desc=f"generating ({self.world} stages)", unit="turn", leave=False)

    # ---- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free this stage's tiers; leave the process group if from_pretrained joined it."""
        self.llm.close()
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_pg = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
