"""The one-pass C kernels for int8 products' ends and int8 rows from 4-bit weights (int8.c) and for
rotary embeddings (rotary.c) give torch's bits, so answers never depend on whether a compiler was there."""
import math

import pytest
import torch
from enginekit import MIXED_PROMPTS

from engine import LLM, Policy, int8, kernels, ops
from engine.compression import CompressionConfig, dequantize, padded_shape, quantize

TORCH_ONLY = {"int8_quantize": None, "int8_scale": None, "rotary": None, "int8_rows_from_4bit": None}


@pytest.fixture
def torch_path(monkeypatch):
    """Call to switch the three kernels off (the rest stay as they are)."""
    def off():
        monkeypatch.setattr(kernels, "_loaded", {**kernels._loaded, **TORCH_ONLY})
    return off


def test_the_kernels_build_here():
    assert all(fn() is not None for fn in (kernels.int8_quantize, kernels.int8_scale, kernels.rotary,
                                           kernels.int8_rows_from_4bit)), \
        "gcc is on every machine of this project: the kernels must build"


# one row; rows with a zero row among them; a decode step's few rows; a prefill's many (threaded)
@pytest.mark.parametrize("rows, k, n", [(1, 7, 3), (5, 33, 65), (8, 576, 1536), (472, 1536, 192)])
def test_int8_ends_give_torch_s_bits(rows, k, n, torch_path):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 30
    x[rows // 2] = 0                                                  # a zero row: scale clamps, values 0
    w = int8.quantize(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    sums = torch.randint(-2 ** 22, 2 ** 22, (rows, n), dtype=torch.int32, generator=g)
    strided = torch.randn(rows, 2 * k, generator=g)[:, ::2]          # rows apart, values apart: copied first
    got = [int8.quantize_rows(x), int8.quantize_rows(strided),
           int8.scale_sums(sums.clone(), w.scale, int8.quantize_rows(x)[1], None),
           int8.scale_sums(sums.clone(), w.scale, int8.quantize_rows(x)[1], bias)]
    torch_path()
    want = [int8.quantize_rows(x), int8.quantize_rows(strided),
            int8.scale_sums(sums.clone(), w.scale, int8.quantize_rows(x)[1], None),
            int8.scale_sums(sums.clone(), w.scale, int8.quantize_rows(x)[1], bias)]
    for a, b in zip(got, want):
        assert all(torch.equal(p, q) for p, q in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


@pytest.mark.parametrize("b, h, s, d, table_rows", [(8, 9, 48, 64, 8), (3, 2, 1, 64, 3), (4, 14, 7, 128, 1),
                                                    (2, 3, 33, 16, 2)])
def test_rotary_gives_torch_s_bits_for_strided_heads(b, h, s, d, table_rows, torch_path):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, s, h, d, generator=g).transpose(1, 2)          # as q and k come from a projection
    cos, sin = ops._rotary_tables(torch.randint(0, 4000, (table_rows, s), generator=g), d, 10000.0, None,
                                  torch.float32)
    got = ops.apply_rotary(x, cos, sin)
    torch_path()
    assert torch.equal(got, ops.apply_rotary(x, cos, sin))


# whole groups; the last group part padding; groups of 2 (one byte); a weight with fewer rows than a group
@pytest.mark.parametrize("shape, group", [((192, 96), 64), ((130, 9), 64), ((100, 20), 24), ((5, 3), 2),
                                          ((40, 300), 64)])
def test_int8_rows_from_4bit_are_those_of_the_float32_copy(shape, group):
    g = torch.Generator().manual_seed(shape[0])
    q = quantize(torch.randn(*shape, generator=g) * 0.05, CompressionConfig(4, group, 0))
    n = math.prod(padded_shape(shape, q.config))
    got = int8.from_4bit(q, torch.empty(n))
    want = int8.quantize_over(dequantize(q, torch.float32, torch.empty(n)))
    assert torch.equal(got.values, want.values) and torch.equal(got.scale, want.scale)
    assert got.values.stride() == want.values.stride()            # the layout _int_mm takes at full speed


def test_int8_rows_from_4bit_decline_what_they_do_not_take():
    q = quantize(torch.randn(64, 32), CompressionConfig(4, 32, 1))   # groups along the input dim
    assert int8.from_4bit(q, torch.empty(64 * 32)) is None
    q = quantize(torch.randn(64, 32), CompressionConfig(4, 32, 0))
    assert int8.from_4bit(q, torch.empty(10)) is None                 # a buffer too small


@pytest.mark.parametrize("compress", [False, True], ids=["int8 held", "4-bit held"])
def test_int8_tokens_and_logits_are_the_same_without_the_kernels(tiny_qwen2, torch_path, compress, monkeypatch):
    """Qwen2: a bias on q, k and v (the kernel adds it), rotary embeddings, int8 products; held 4-bit,
    each prefill makes the int8 rows from the 4-bit values."""
    from engine import compression
    for limit in ("KERNEL_MAX_ROWS", "SHARED_MAX_ROWS"):     # tiny prompts: make even these prefills int8 rows
        monkeypatch.setattr(compression, limit, 0)
    made = []
    from_4bit = int8.from_4bit
    monkeypatch.setattr(int8, "from_4bit", lambda *a: made.append(from_4bit(*a)) or made[-1])
    llm = LLM.from_pretrained(tiny_qwen2[0], progress=False, policy=Policy(int8_matmul=True, compress_weight=compress))
    tokens, logits = llm.generate(MIXED_PROMPTS, max_new_tokens=6, ignore_eos=True), llm.logits(MIXED_PROMPTS)
    assert all(m is not None for m in made) and (len(made) > 0) == compress     # the kernel made the rows
    torch_path()
    assert llm.generate(MIXED_PROMPTS, max_new_tokens=6, ignore_eos=True) == tokens
    assert torch.equal(llm.logits(MIXED_PROMPTS), logits)


def test_kernels_can_be_left_out_by_name_and_a_wrong_name_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("FLEXWRANGLE_KERNELS_OFF", "rotary, int8_scale")
    assert kernels.rotary() is None and kernels.int8_scale() is None
    assert kernels.int8_quantize() is not None
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("FLEXWRANGLE_KERNELS_OFF", "rotery")
    with pytest.raises(ValueError, match="rotery: the kernels are qlinear, attention, rotary"):
        kernels.rotary()
