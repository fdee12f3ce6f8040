"""int8 products (Policy.int8_matmul): the format, the product, and the same tokens under every placement."""
import pytest
import torch
from enginekit import MIXED_PROMPTS, POLICIES, hf_last_logits

from engine import LLM, Policy, int8

PROMPTS = MIXED_PROMPTS * 2


@pytest.mark.parametrize("shape", [(48, 40), (7, 13)])                 # (7, 13): 91 value bytes, odd
def test_format_round_trips_within_half_a_step_per_row(shape):
    w = torch.randn(*shape) * torch.logspace(-2, 1, shape[0])[:, None]  # rows of very different ranges
    q = int8.quantize(w)
    assert q.values.dtype == torch.int8 and q.scale.shape == (shape[0],)
    assert ((int8.dequantize(q) - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    raw = int8.encode(w[None])
    assert raw.shape == (1, int8.nbytes(w.shape))
    back = int8.unpack(raw, w.shape)
    assert torch.equal(back.values, q.values) and torch.equal(back.scale, q.scale)


def test_product_is_close_to_float_and_each_row_independent_of_its_batch():
    torch.manual_seed(0)
    x, w, bias = torch.randn(9, 64), torch.randn(24, 64), torch.randn(24)
    q = int8.quantize(w)
    y = int8.linear(x, q, bias)
    want = x @ w.T + bias
    assert (y - want).norm() / want.norm() < 0.02
    for i in range(9):          # one row alone gives that row of the batch, bit for bit
        int8.forget()
        assert torch.equal(int8.linear(x[i: i + 1], q, bias), y[i: i + 1])


def test_an_input_changed_in_place_is_quantized_again():
    x, q = torch.randn(4, 32), int8.quantize(torch.randn(8, 32))
    before = int8.linear(x, q)
    x.mul_(2)
    assert torch.allclose(int8.linear(x, q), 2 * before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 70), (70, 300), (5, 3)])
def test_quantizing_over_a_weight_s_own_memory_gives_quantize_s_numbers(shape, monkeypatch):
    monkeypatch.setattr(int8, "CHUNK_ELEMS", 256)               # several runs of rows
    w = torch.randn(*shape)
    w[0, 1] = 40.0
    want = int8.quantize(w)
    padded = torch.zeros(shape[1], shape[0] + 6)[:, :shape[0]]      # dequantize's layout for unpadded groups
    padded.copy_(w.t())
    for layout in (w.clone(), w.t().contiguous().t(), padded.t()):     # (out, in), and (in, out).T
        got = int8.quantize_over(layout)
        assert torch.equal(got.values, want.values) and torch.equal(got.scale, want.scale)
        assert got.values.untyped_storage().data_ptr() == layout.untyped_storage().data_ptr()


@pytest.mark.parametrize("compress", [False, True], ids=["int8 held", "4-bit held"])
@pytest.mark.parametrize("name", POLICIES)
def test_every_placement_gives_the_in_memory_int8_tokens(name, compress, tiny_qwen2, tmp_path):
    """Decoder matrices held as int8 rows, or held 4-bit and made int8 rows as each block loads them."""
    want = LLM.from_pretrained(tiny_qwen2[0], progress=False,
                               policy=Policy(gpu_batch_size=12, int8_matmul=True, compress_weight=compress)).generate(
        PROMPTS, max_new_tokens=8, ignore_eos=True)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, int8_matmul=True, **{"compress_weight": compress,
                                                                           **POLICIES[name]})
    llm = LLM.from_pretrained(tiny_qwen2[0], policy=policy, offload_dir=tmp_path, progress=False)
    assert llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True) == want
    held = [a for layer in llm.layers if layer.index >= 0 for a in layer.weights.arrays.values()
            if len(a.shape) == 2]
    # decoder matrices only; embeddings stay float
    assert held and all((a.fmt.quant is not None) if compress else a.fmt.int8 for a in held)
    llm.close()


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama", "tiny_qwen2"])
def test_logits_stay_close_to_float32(fixture, request):
    path, hf = request.getfixturevalue(fixture)
    want = hf_last_logits(hf, MIXED_PROMPTS)
    got = LLM.from_pretrained(path, progress=False, dtype="float32",
                              policy=Policy(int8_matmul=True)).logits(MIXED_PROMPTS)
    assert (got - want).norm() / want.norm() < 0.05
    assert not torch.equal(got, want)                      # (it is the int8 path)


def test_held_4_bit_weights_become_int8_rows_for_prefill_and_stay_packed_for_few_rows(tiny_qwen2):
    """A prefill-sized load requantizes; a load for steps that multiply packed keeps 4-bit values,
    which the C kernel (or the torch path) multiplies with float activations."""
    from engine.compression import QuantizedWeight
    from engine.int8 import Int8Weight
    llm = LLM.from_pretrained(tiny_qwen2[0], progress=False, policy=Policy(int8_matmul=True, compress_weight=True))
    try:
        layer = next(lay for lay in llm.layers if lay.index >= 0)
        for packed, kind in ((False, Int8Weight), (True, QuantizedWeight)):
            with layer.weights.load(llm.pool, packed) as load:
                w = load.finish(defer=packed)
                matrices = [t for t in w.values() if not isinstance(t, torch.Tensor) or t.dim() == 2]
                assert matrices and all(isinstance(t, kind) for t in matrices)
    finally:
        llm.close()
