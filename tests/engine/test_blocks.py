"""Blocks of prompts: order, shared prefix, micro-batch layout and token recording (engine.blocks)."""
import torch

from engine import ops
from engine.blocks import Decoding, Workload, run_workload
from engine.config import ModelConfig
from engine.policy import Policy

CFG = ModelConfig(family="opt", name="tiny", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                  ffn_dim=32, max_positions=64, pad_token_id=1)


def test_plan_sorts_by_length_and_finds_the_shared_prefix():
    prompts = [[2, 3, 4, 5, 6], [2, 3, 7], [2, 3, 4, 8]]

    work = Workload.plan(prompts, max_new=4)

    assert work.order == [1, 2, 0]
    assert work.prefix_len == 2 and work.longest == 3
    assert work.blocks(2) == [[1, 2], [0]]
    assert work.prefix() == Workload([[2, 3]], max_new=1, order=[0])
    assert Workload.plan(prompts, max_new=4, bucket=False, share_prefix=False).order == [0, 1, 2]
    assert Workload.plan(prompts, max_new=4, share_prefix=False).prefix_len == 0


def test_microbatches_left_pad_after_the_prefix():
    work = Workload.plan([[2, 3, 4, 5, 6], [2, 3, 7], [2, 3, 4, 8]], max_new=2)

    mbs = work.microbatches([1, 2, 0], CFG, Policy(gpu_batch_size=2))
    (short,) = work.microbatches([1, 2], CFG, Policy(gpu_batch_size=2))

    assert [mb.rows for mb in mbs] == [[1, 2], [0]]
    assert mbs[0].ids.tolist() == [[1, 1, 7], [1, 4, 8]]         # own tokens, padded to the block's longest
    assert mbs[1].ids.tolist() == [[4, 5, 6]] and mbs[1].length == 2 == mbs[1].prefix_len
    assert short.ids.tolist() == [[1, 7], [4, 8]]
    assert short.mask.tolist() == [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]   # prefix, padding, own, new


def test_record_stops_each_sequence_at_its_own_stop():
    work = Workload.plan([[2, 3], [2, 4]], max_new=3, share_prefix=False)
    (mb,) = work.microbatches([0, 1], CFG, Policy())
    decoding = Decoding(stop_ids=frozenset({9}))

    decoding.record(mb, torch.tensor([9, 5]))
    decoding.record(mb, torch.tensor([6, 7]))

    assert mb.tokens == [[9], [5, 7]] and mb.done.tolist() == [True, False]


def test_run_workload_computes_the_prefix_once_then_every_block():
    work = Workload.plan([[2, 3, 4], [2, 3, 5], [2, 3, 6, 7]], max_new=2)
    calls = []

    class Cache:
        closed = False

        def close(self):
            self.closed = True
    cache = Cache()

    def run_blocks(w, blocks, decoding, *, prefix, prefix_pass):
        calls.append((w.prompts, blocks, prefix, prefix_pass, decoding.sampler is ops.greedy))
        for rows in blocks:
            for mb in w.microbatches(rows, CFG, Policy(gpu_batch_size=2)):
                mb.caches = {0: cache} if prefix_pass else {}
                yield mb

    got = [mb.rows for mb in run_workload(work, 2, Decoding(sampler=torch.argmin), run_blocks)]

    assert got == [[0, 1], [2]]
    assert calls == [([[2, 3]], [[0]], None, True, True),
                     (work.prompts, [[0, 1], [2]], {0: cache}, False, False)]
    assert cache.closed                                           # the prefix's cache, once every block is done
