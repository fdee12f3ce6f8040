"""Group-wise quantization: pure-function properties, then equivalence inside the engine."""
import pytest
import torch
from enginekit import MIXED_PROMPTS

from engine import LLM, CompressionConfig, Policy
from engine import compression
from engine.compression import (QuantizedWeight, compressed_nbytes, dequantize, gather_rows, padded_shape,
                                quantize)


def bound(x, cfg):
    """Per-value error allowed: half a step of the value's group, plus float16 rounding of min/step."""
    from engine.compression import _to_groups
    g = _to_groups(x.float(), cfg)
    rng = (g.amax(1) - g.amin(1)) / (2 * (2 ** cfg.num_bits - 1))
    return rng.max() * (1 + 2 ** -9) + g.abs().max() * 2 ** -10


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, dim", [((128, 64), 0), ((33, 70), 1), ((3, 5, 7), -1), ((65,), 0)])
def test_round_trip_error_within_half_a_step(bits, shape, dim):
    cfg = CompressionConfig(num_bits=bits, group_size=32, group_dim=dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    q = quantize(x, cfg)
    y = dequantize(q)
    assert y.shape == x.shape
    assert (y - x).abs().max() <= bound(x, cfg)
    assert q.nbytes == compressed_nbytes(shape, cfg)


def test_odd_sizes_pack_two_values_per_byte_and_unpad():
    cfg = CompressionConfig(num_bits=4, group_size=4, group_dim=0)
    x = torch.arange(7, dtype=torch.float32)                       # 2 groups, the last padded by one
    q = quantize(x, cfg)
    assert q.packed.shape == (2, 2) and q.packed.dtype == torch.uint8
    assert torch.allclose(dequantize(q), x, atol=2 / 15 / 2 + 1e-2)      # half a step of the widest group


@pytest.mark.parametrize("shape, dim", [((96, 40), 0), ((100, 64), 0), ((5, 70), -1)])
def test_dequantize_into_a_buffer_returns_a_view_of_it(shape, dim):
    cfg = CompressionConfig(num_bits=4, group_size=32, group_dim=dim)
    q = quantize(torch.randn(shape), cfg)
    buf = torch.full(padded_shape(shape, cfg), float("nan"))     # whole groups: no temporary, no copy
    y = dequantize(q, out=buf)
    assert y.data_ptr() == buf.data_ptr() and y.shape == shape
    assert torch.equal(y, dequantize(q))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, dim", [((100, 24), 0), ((96, 40), 0), ((40, 70), -1), ((40, 64), 1)])
def test_gather_rows_equals_indexing_the_dequantized_table(bits, shape, dim):
    q = quantize(torch.randn(shape), CompressionConfig(num_bits=bits, group_size=32, group_dim=dim))
    ids = torch.tensor([[0, shape[0] - 1, 17], [31, 32, 17]])    # both nibbles, repeats, the padded group
    assert torch.equal(gather_rows(q, ids), dequantize(q)[ids])


def assert_product(got, x, w):
    """got == x @ w.T up to float32 rounding: the packed paths sum in another order (in runs, and the
    kernel adds each group's minimum term apart), so the bound scales with the sum of |terms|."""
    scale = (x.abs() @ w.abs().T).max()
    assert (got - x @ w.T).abs().max() <= 1e-5 * scale + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, dim", [((100, 24), 0), ((96, 40), 0), ((40, 70), 1), ((40, 64), -1)])
def test_dequantizing_in_runs_changes_no_value(bits, shape, dim, monkeypatch):
    q = quantize(torch.randn(shape), CompressionConfig(num_bits=bits, group_size=32, group_dim=dim))
    whole = dequantize(q)
    monkeypatch.setattr(compression, "CHUNK_ELEMS", 64)          # two groups a run
    assert torch.equal(dequantize(q), whole)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, dim", [((100, 24), 0), ((96, 40), 0), ((40, 70), 1), ((40, 64), -1)])
@pytest.mark.parametrize("chunk, kernel_rows", [(64, 0), (1 << 19, 0), (1 << 19, 32)])
def test_linear_on_a_quantized_weight_equals_multiplying_the_dequantized_one(bits, shape, dim, chunk, kernel_rows,
                                                                             monkeypatch):
    q = quantize(torch.randn(shape), CompressionConfig(num_bits=bits, group_size=32, group_dim=dim))
    x = torch.randn(5, shape[1])
    monkeypatch.setattr(compression, "CHUNK_ELEMS", chunk)       # many runs, or one
    monkeypatch.setattr(compression, "KERNEL_MAX_ROWS", kernel_rows)   # torch, or the C kernel where it applies
    scratch = torch.full(padded_shape(shape, q.config), float("nan"))
    got = compression.linear(x, QuantizedWeight(q, scratch))
    assert_product(got, x, dequantize(q))


def test_the_c_kernel_builds_here_and_matches_torch_on_odd_shapes():
    from engine import kernels
    assert kernels.qlinear() is not None, "gcc is on every machine of this project: the kernel must build"
    # rows: whole blocks (8 with AVX-512, else 4), blocks of four and each remainder; groups padded
    # inside (24, 2) and at the end; input rows short of one 64-line pass, and two passes and a tail
    for rows, (out_f, in_f), group in [(1, (130, 9), 64), (7, (64, 33), 16), (32, (257, 64), 128),
                                       (5, (100, 20), 24), (64, (70, 47), 32), (2, (40, 5), 2),
                                       (203, (130, 40), 64), (12, (70, 150), 32)]:
        q = quantize(torch.randn(out_f, in_f), CompressionConfig(num_bits=4, group_size=group, group_dim=0))
        assert compression.use_kernel(rows, q)
        x = torch.randn(rows, in_f)
        got = compression.linear(x, QuantizedWeight(q, torch.empty(0)))
        assert_product(got, x, dequantize(q))


def test_packed_multiplies_of_several_micro_batches_only_where_the_kernel_takes_the_format():
    along_out, along_in = CompressionConfig(4, 64, 0), CompressionConfig(4, 64, 1)
    assert compression.multiply_packed(16, 3, along_out)
    assert not compression.multiply_packed(16, 3, along_in)    # torch path: dequantize once per block
    assert compression.multiply_packed(16, 1, along_in)        # one use: in cache beats once via DRAM
    assert not compression.multiply_packed(compression.KERNEL_MAX_ROWS + 1, 1, along_out)
    # one use goes to the kernel further than a copy several micro-batches share
    assert compression.multiply_packed(compression.SHARED_MAX_ROWS + 1, 1, along_out)
    assert not compression.multiply_packed(compression.SHARED_MAX_ROWS + 1, 2, along_out)
    # the kernel runs on the CPU only: elsewhere the torch path's rule holds
    assert not compression.multiply_packed(16, 3, along_out, on_cpu=False)
    assert not compression.multiply_packed(compression.SHARED_MAX_ROWS + 1, 1, along_out, on_cpu=False)


def test_without_the_kernel_the_torch_path_gives_the_same_product(monkeypatch):
    from engine import kernels
    monkeypatch.setenv("FLEXWRANGLE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.qlinear() is None
    q = quantize(torch.randn(96, 40), CompressionConfig(num_bits=4, group_size=32, group_dim=0))
    assert not compression.use_kernel(2, q)
    x = torch.randn(2, 40)
    got = compression.linear(x, QuantizedWeight(q, torch.empty(padded_shape(q.shape, q.config))))
    assert_product(got, x, dequantize(q))


@pytest.mark.parametrize("value", [0.0, 5.0, -1e-3, 60000.0])
def test_constant_groups_come_back_exact_never_nan(value):
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
    x = torch.full((4, 64), value)
    y = dequantize(quantize(x, cfg))
    assert torch.isfinite(y).all()
    assert torch.equal(y, x.half().float())


def test_symmetric_groups():
    cfg = CompressionConfig(num_bits=8, group_size=16, group_dim=0, symmetric=True)
    x = torch.randn(64)
    assert (dequantize(quantize(x, cfg)) - x).abs().max() <= 2 * x.abs().max() / 255 + 1e-3


def test_weights_shrink_more_than_3_5x_against_float16():
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
    assert 2048 * 2048 * 2 / compressed_nbytes((2048, 2048), cfg) >= 3.5


SMALL_GROUPS = dict(comp_weight_config=CompressionConfig(4, 16, 0), comp_cache_config=CompressionConfig(4, 8, -1))
OFFLOADED = [dict(w_gpu_percent=0, w_cpu_percent=50, cache_gpu_percent=20, cache_cpu_percent=40),
             dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0, overlap=False),
             dict(w_gpu_percent=40, w_cpu_percent=60, cache_gpu_percent=0, cache_cpu_percent=100,
                  cpu_cache_compute=True)]


@pytest.mark.parametrize("which", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("placement", OFFLOADED)
def test_compressed_offloaded_equals_compressed_in_memory(which, placement, tiny_opt, tmp_path):
    flags = dict(compress_weight=which[0], compress_cache=which[1], **SMALL_GROUPS)
    in_memory = LLM.from_pretrained(tiny_opt[0], policy=Policy(gpu_batch_size=12, **flags), progress=False)
    want = in_memory.generate(MIXED_PROMPTS * 2, max_new_tokens=8, ignore_eos=True)
    llm = LLM.from_pretrained(tiny_opt[0], policy=Policy(gpu_batch_size=2, num_gpu_batches=3, **flags, **placement),
                              offload_dir=tmp_path, progress=False)
    assert llm.generate(MIXED_PROMPTS * 2, max_new_tokens=8, ignore_eos=True) == want


@pytest.mark.parametrize("placement", OFFLOADED)
def test_qwen2_compressed_offloaded_equals_compressed_in_memory(placement, tiny_qwen2, tmp_path):
    flags = dict(compress_weight=True, compress_cache=True, **SMALL_GROUPS)
    in_memory = LLM.from_pretrained(tiny_qwen2[0], policy=Policy(gpu_batch_size=12, **flags), progress=False)
    want = in_memory.generate(MIXED_PROMPTS * 2, max_new_tokens=8, ignore_eos=True)
    llm = LLM.from_pretrained(tiny_qwen2[0], policy=Policy(gpu_batch_size=2, num_gpu_batches=3, **flags,
                                                            **placement), offload_dir=tmp_path, progress=False)
    assert llm.generate(MIXED_PROMPTS * 2, max_new_tokens=8, ignore_eos=True) == want


def test_compressed_weights_are_held_compressed(tiny_opt, tmp_path):
    plain = LLM.from_pretrained(tiny_opt[0], policy=Policy(w_gpu_percent=0, w_cpu_percent=50),
                                offload_dir=tmp_path, progress=False)
    packed = LLM.from_pretrained(tiny_opt[0], policy=Policy(w_gpu_percent=0, w_cpu_percent=50,
                                                            compress_weight=True, **SMALL_GROUPS),
                                 offload_dir=tmp_path, progress=False)
    assert packed.weight_bytes()["cpu"] < plain.weight_bytes()["cpu"] / 2


def test_compressed_logits_stay_close_to_uncompressed(tiny_opt):
    base = LLM.from_pretrained(tiny_opt[0], dtype="float32", progress=False).logits(MIXED_PROMPTS)
    for flags in (dict(compress_weight=True), dict(compress_cache=True)):
        llm = LLM.from_pretrained(tiny_opt[0], dtype="float32", progress=False,
                                  policy=Policy(**flags, **SMALL_GROUPS))
        got = llm.logits(MIXED_PROMPTS)
        # 4-bit groups of 16 on a random tiny model: a stated tolerance, not equality
        assert (got - base).abs().max() < 0.05 * base.abs().max() + 0.05
        assert torch.isfinite(got).all()


def test_a_4_bit_cache_keeps_small_channels_beside_a_large_one():
    """Keys with one channel far larger than the rest (Qwen2's key bias): groups along head_dim
    would leave the small channels a level or two; the per-channel normalisation keeps them."""
    from engine.kv_cache import KVCache
    from engine.tiers import BufferPool, Tiers

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 40, 64, generator=g)               # (b, n_kv, s, d)
    k[..., 5] += 200.0                                       # an offset channel, as a bias makes
    v = torch.randn(2, 2, 40, 64, generator=g)
    tiers = Tiers(None)
    policy = Policy(compress_cache=True)
    cache = KVCache(tiers, policy, 2, 2, 64, 48, torch.float16, "t")
    cache.write(0, k[:, :, :32], v[:, :, :32])                # the prompt: the statistics come from it
    cache.write(32, k[:, :, 32:], v[:, :, 32:])               # later tokens reuse them
    with cache.read(40, BufferPool(tiers.trackers["gpu"])) as read:
        (part,) = read.parts
        small = [c for c in range(64) if c != 5]
        err = (part.k[..., small] - k[..., small]).abs().mean() / k[..., small].abs().mean()
        assert err < 0.1                                     # min-max over a group with 200 in it: ~3
        assert torch.allclose(part.v, v, atol=0.5)
    cache.close()
