"""Decode attention by the C kernel (engine/kernels/attention.c): the torch math on float32 copies,
from any stored dtype and layout, and the same tokens when kernels are off."""
import pytest
import torch
from enginekit import MIXED_PROMPTS

from engine import LLM, Policy, kernels, ops


def _cache_rows(t, b, nkv, d, dtype, gen):
    """A cache laid out as KVCache holds it: row per position, (2, b, n_kv, d), viewed (b, n_kv, t, d)."""
    rows = torch.randn(t, 2, b, nkv, d, generator=gen).to(dtype)
    kv = rows.permute(1, 2, 3, 0, 4)
    return kv[0], kv[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b, nh, nkv, d", [(5, 4, 4, 64), (3, 6, 2, 12), (1, 9, 3, 8), (4, 2, 1, 5)])
def test_the_kernel_matches_torch_over_float32_copies(dtype, b, nh, nkv, d):
    assert kernels.attention() is not None, "gcc is on every machine of this project: the kernel must build"
    gen = torch.Generator().manual_seed(b * 100 + nh * 10 + d)
    prefix = _cache_rows(7, 1, nkv, d, dtype, gen)                 # batch 1: shared by every sequence
    past = _cache_rows(11, b, nkv, d, dtype, gen)
    new = (torch.randn(b, nkv, 1, d, generator=gen), torch.randn(b, nkv, 1, d, generator=gen))   # float32
    q = torch.randn(b, nh, 1, d, generator=gen)
    mask = torch.ones(b, 19, dtype=torch.long)
    mask[0, 7:10] = 0                                              # a left-padded sequence's pads
    bias = ops.attention_mask_bias(mask, 1, torch.float32)
    segments = [prefix, past, new]
    got = ops.attend_decode(q, segments, bias, 0.3)
    want = ops.attend_segments(q, [(k.float(), v.float()) for k, v in segments], bias, 0.3)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_kernel_declines_what_it_does_not_take():
    q, kv = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    bias = torch.zeros(2, 1, 3, 5)
    assert ops.attend_decode(q, [(kv, kv)], bias) is None                      # a prefill: 3 queries
    q1 = torch.randn(2, 4, 1, 8)
    ints = torch.zeros(2, 4, 5, 8, dtype=torch.int32)
    assert ops.attend_decode(q1, [(ints, ints)], bias[:, :, :1]) is None        # not a float dtype
    got = ops.attend_any(q1, [(kv.half(), kv.half())], bias[:, :, :1])           # then torch on float32
    want = ops.attend_segments(q1, [(kv.half().float(), kv.half().float())], bias[:, :, :1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cpu_tier_fp16_cache_is_attended_in_place_without_working_copies(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False,
                              policy=Policy(gpu_batch_size=4, cache_gpu_percent=0, cache_cpu_percent=100))
    borrowed = []
    original = llm.pool.get
    llm.pool.get = lambda shape, dtype, device, what="": borrowed.append(what) or original(shape, dtype, device, what)
    llm.generate(MIXED_PROMPTS[:4], max_new_tokens=4, ignore_eos=True)
    assert not [w for w in borrowed if "working copy" in w and "kv" in w]
    llm.close()


def test_with_kernels_off_every_placement_still_gives_the_same_tokens(tiny_opt, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXWRANGLE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.attention() is None
    def run(**placement):
        llm = LLM.from_pretrained(tiny_opt[0], policy=Policy(gpu_batch_size=3, **placement), offload_dir=tmp_path,
                                  progress=False)
        try:
            return llm.generate(MIXED_PROMPTS, max_new_tokens=6, ignore_eos=True)
        finally:
            llm.close()
    reference = run()
    assert run(cache_gpu_percent=0, cache_cpu_percent=100) == reference
    assert run(cache_gpu_percent=30, cache_cpu_percent=30) == reference        # all three tiers
