"""Prompts cut into blocks: their order, the prefix they share, their micro-batches and decoding.

Shared by LLM (one process runs a block at a time) and PipelineLLM (each rank runs its stage over
groups of micro-batches): both describe the call as a `Workload` and a `Decoding`, and
`run_workload` computes the shared prefix once and then every block, through the caller's own
way of running blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch

from . import ops
from .config import ModelConfig
from .policy import Policy
from .prompts import common_prefix_len, hits_stop, stop_sets
from .schedule import MicroBatch


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen and when a sequence stops."""
    sampler: Callable[[torch.Tensor], torch.Tensor] = ops.greedy   # (b, vocab) logits -> (b,) ids
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    tokenizer: object = field(default=None, compare=False)          # decodes tokens to match stop strings

    @classmethod
    def build(cls, config: ModelConfig, tokenizer, *, do_sample: bool = False, temperature: float = 1.0,
              top_p: float = 1.0, stop=None, seed: int | None = None, ignore_eos: bool = False) -> "Decoding":
        """The decoding of generate()'s options (see LLM.generate)."""
        stop_ids, stop_strings = stop_sets(stop, ignore_eos, config, tokenizer)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = lambda logits: ops.sample(logits, do_sample, temperature, top_p, generator)
        return cls(sampler, frozenset(stop_ids), tuple(stop_strings), tokenizer)

    def record(self, mb: MicroBatch, next_ids: torch.Tensor) -> None:
        """Append each live sequence's token (b,); mark the sequence done at a stop."""
        for i, t in enumerate(next_ids.tolist()):
            if mb.done[i]:
                continue
            mb.tokens[i].append(t)
            if t in self.stop_ids or (self.stop_strings
                                      and hits_stop(self.tokenizer, mb.tokens[i], self.stop_strings)):
                mb.done[i] = True


@dataclass(frozen=True)
class Workload:
    """Checked prompts, the order blocks take them in, and the token prefix they all share."""
    prompts: list[list[int]]
    max_new: int                          # tokens to generate per sequence
    order: list[int]                      # prompt indices, shortest first when bucketed
    prefix_len: int = 0                   # tokens every prompt starts with, computed once
    score_len: int = 1                    # last positions the head scores (1 = next token only)

    @classmethod
    def plan(cls, prompts: list[list[int]], *, max_new: int, bucket: bool = True, share_prefix: bool = True,
             score_len: int = 1) -> "Workload":
        """Blocks take the prompts shortest first when `bucket`; with `share_prefix`, the longest
        token prefix common to all (leaving each `score_len` tokens of its own) is computed once."""
        order = sorted(range(len(prompts)), key=lambda r: len(prompts[r])) if bucket else list(range(len(prompts)))
        prefix_len = common_prefix_len(prompts, keep=score_len) if share_prefix and len(prompts) > 1 else 0
        return cls(prompts, max_new, order, prefix_len, score_len)

    @property
    def longest(self) -> int:
        """Tokens of the longest prompt after the shared prefix."""
        return max(len(p) for p in self.prompts) - self.prefix_len

    def blocks(self, block_size: int) -> list[list[int]]:
        """The prompt indices of each block, in order."""
        return [self.order[i: i + block_size] for i in range(0, len(self.order), block_size)]

    def prefix(self) -> "Workload":
        """The shared prefix as a workload of its own: one sequence, one step."""
        return Workload([self.prompts[0][:self.prefix_len]], max_new=1, order=[0])

    def microbatches(self, rows: list[int], config: ModelConfig, policy: Policy) -> list[MicroBatch]:
        """The micro-batches of the block `rows` (no KV cache yet). Sequences are
        [shared prefix][left padding][own tokens], padded to the block's longest."""
        s = max(len(self.prompts[r]) - self.prefix_len for r in rows)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        total = self.prefix_len + s + self.max_new
        mbs = []
        for lo in range(0, len(rows), policy.gpu_batch_size):
            sub = rows[lo: lo + policy.gpu_batch_size]
            ids = torch.full((len(sub), s), pad, dtype=torch.long)                  # (b, s)
            mask = torch.zeros((len(sub), total), dtype=torch.long)                 # (b, s + max_new)
            mask[:, :self.prefix_len] = 1
            for i, r in enumerate(sub):
                own = self.prompts[r][self.prefix_len:]
                ids[i, s - len(own):] = torch.tensor(own, dtype=torch.long)
                mask[i, self.prefix_len + s - len(own):] = 1
            mbs.append(MicroBatch(sub, ids, mask, length=self.prefix_len, prefix_len=self.prefix_len, feed=ids,
                                  tokens=[[] for _ in sub], done=torch.zeros(len(sub), dtype=torch.bool),
                                  score_len=self.score_len))
        return mbs


class RunBlocks(Protocol):
    def __call__(self, work: Workload, blocks: list[list[int]], decoding: Decoding, *,
                 prefix: dict | None, prefix_pass: bool) -> Iterable[MicroBatch]:
        """Compute `blocks` of `work`, reading the shared prefix's KV cache `prefix`; yield each
        micro-batch once it is done. `prefix_pass`: this computes the shared prefix itself, whose
        caches stay open for the blocks after it."""


def run_workload(work: Workload, block_size: int, decoding: Decoding, run_blocks: RunBlocks) -> Iterator[MicroBatch]:
    """The shared prefix once, then every block of `work` reading its KV cache; yields finished
    micro-batches and closes the prefix's cache at the end."""
    prefix = None
    try:
        if work.prefix_len:
            (pmb,) = run_blocks(work.prefix(), [[0]], Decoding(), prefix=None, prefix_pass=True)
            prefix = pmb.caches
        yield from run_blocks(work, work.blocks(block_size), decoding, prefix=prefix, prefix_pass=False)
    finally:
        for c in (prefix or {}).values():
            c.close()
