"""The placement plan is what the engine executes: what a layer load or a cache read borrows is what
the plan says, and a load or read gives back everything it borrowed when its with block ends."""
import pytest
import torch

from engine import LLM, Policy
from engine.accounting import MemoryTracker
from engine.disk import STAGING
from engine.kv_cache import KVCache
from engine.placement import Precision, plan_cache, plan_layer, tier_at
from engine.pools import BufferPool
from engine.tiers import Tiers

PRECISIONS = {
    "plain": dict(),
    "4-bit weights and cache": dict(compress_weight=True, compress_cache=True),
    "int8 products": dict(int8_matmul=True),
    "4-bit weights made int8": dict(int8_matmul=True, compress_weight=True),
}
PLACEMENTS = {
    "compute device": dict(),
    "three tiers": dict(w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=34, cache_cpu_percent=33),
    "disk": dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0),
}


@pytest.fixture(scope="module", params=list(PRECISIONS))
def precision(request):
    return PRECISIONS[request.param]


@pytest.mark.parametrize("where", list(PLACEMENTS))
def test_a_layer_load_borrows_what_its_plan_says_and_gives_all_of_it_back(tiny_opt, tmp_path, precision, where):
    policy = Policy(**PLACEMENTS[where], **precision)
    llm = LLM.from_pretrained(tiny_opt[0], policy=policy, offload_dir=tmp_path, progress=False)
    try:
        for layer in llm.layers:
            for packed in (False, True):
                tracker = MemoryTracker("gpu", 1 << 40)
                pool = BufferPool(tracker)
                with layer.weights.load(pool, packed) as load:
                    load.finish(defer=packed)
                    assert tracker.current == layer.weights.working_bytes(packed)   # the plan's figure
                    assert pool.idle_bytes == 0                                      # all of it lent out
                assert pool.idle_bytes == tracker.current                            # all of it back
                assert load.tensors == {}
    finally:
        llm.close()


def test_a_load_discarded_unfinished_gives_back_its_staging_and_buffers(tiny_opt, tmp_path):
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0, compress_weight=True)
    llm = LLM.from_pretrained(tiny_opt[0], policy=policy, offload_dir=tmp_path, progress=False)
    try:
        layer = next(lay for lay in llm.layers if lay.index >= 0)     # packed 4-bit weights view the read
        pool = BufferPool(MemoryTracker("gpu", 1 << 40))
        released = []
        original = STAGING.put
        STAGING.put = lambda buf: released.append(buf) or original(buf)
        try:
            load = layer.weights.load(pool)
            assert released == []                   # the shared read's staging buffer is still viewed
            load.close()                            # a prefetch nobody used
        finally:
            STAGING.put = original
        assert len(released) == 1                   # one read of the layer's file, given back once
        assert pool.idle_bytes == pool.tracker.current > 0
    finally:
        llm.close()


@pytest.mark.parametrize("where", list(PLACEMENTS))
def test_a_cache_read_borrows_what_its_plan_says_and_gives_it_back(tmp_path, precision, where):
    policy = Policy(**PLACEMENTS[where], **precision)
    tiers = Tiers(tmp_path)
    cache = KVCache(tiers, policy, 3, 2, 8, 12, torch.float16, "t")
    try:
        cache.write(0, torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
        pool = BufferPool(MemoryTracker("gpu", 1 << 40))
        plans = plan_cache(3, 2, 8, policy.percents("cache"), Precision.of(policy, "cpu", torch.float16))
        with cache.read(5, pool) as read:
            assert [(p.tier, p.hi - p.lo) for p in read.parts] == [(p.tier, p.n_seq) for p in plans]
            assert pool.tracker.current == sum(p.copy_bytes(12) for p in plans)
        assert pool.idle_bytes == pool.tracker.current
        assert read.parts is None
    finally:
        cache.close()


def test_a_tied_head_is_planned_where_the_embedding_is_held():
    from engine.models import WeightSpec
    precision = Precision("cpu", torch.float16)
    earlier = {}
    embed = plan_layer([WeightSpec("embed_tokens", "emb", (100, 8)), WeightSpec("pos", "pos", (300, 8))],
                       precision, False, earlier)
    head = plan_layer([WeightSpec("ln", "ln", (8,)), WeightSpec("lm_head", "emb", (100, 8))], precision, False,
                      earlier)
    assert [p.tied for p in head] == [False, True]
    assert head[1].mid == embed[0].mid and head[1].held_bytes("cpu") == 0 < head[1].stored_bytes("cpu")
    assert tier_at(embed[0].mid, (10, 40, 50)) == "cpu" and tier_at(embed[1].mid, (10, 40, 50)) == "disk"
