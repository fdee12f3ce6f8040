"""int8 weights multiplied by int8 activations (W8A8): the opt-in `Policy.int8_matmul` path.

A weight (out, in) is held as int8 values with one float32 scale per output row (symmetric,
absmax / 127). At multiply time each row of activations gets its own scale the same way, and
`torch._int_mm` (oneDNN's VNNI/AMX kernels on CPUs that have them) multiplies the int8 matrices
into int32, which the two scales bring back to float:

    y[m, n] = sum_k x[m, k] w[n, k]  ~=  a_scale[m] * w_scale[n] * sum_k xq[m, k] wq[n, k]

Why per row and per output channel: both scales then factor out of the sum over k, so one integer
product does the whole matmul. Each row is quantized on its own, so the quantization adds no dependence
between the rows of a batch (every placement of the same batch gives the same tokens). Float rounding
elsewhere (attention over different padding, matmul blocking for other row counts) does vary with the
batch's shape, and rounding to int8 can turn such a difference into another answer: on the same Beer
pairs, blocks of 8 and of 64 rows gave F1 80.0 and 82.4 (docs/benchmarks.md).

It changes logits (about 1-2 % relative error per product on Qwen2.5-1.5B, up to 5-10 % on the MLP's
down projection, whose inputs have outlier channels), so it is opt-in; docs/benchmarks.md reports
its logits error, greedy agreement and F1 beside the float32 path.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from . import kernels


class Int8Weight(NamedTuple):
    values: torch.Tensor     # int8 (out, in)
    scale: torch.Tensor      # float32 (out,)


def nbytes(shape) -> int:
    """Bytes of a 2-D weight (out, in) in this format: the int8 values and a float32 scale per row."""
    out_f, in_f = shape
    return out_f * in_f + out_f * 4


def quantize(w: torch.Tensor) -> Int8Weight:
    """w (..., out, in) float -> int8 values and per-row scales (symmetric absmax)."""
    w = w.float()
    scale = w.abs().amax(dim=-1).clamp_min(1e-30) / 127.0
    values = (w / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Weight(values, scale)


# Rows converted per pass of `quantize_over`: a cache-sized run of float32, so its temporaries stay small
CHUNK_ELEMS = 1 << 19


def quantize_over(w: torch.Tensor) -> Int8Weight:
    """`quantize(w)` for a float32 weight (out, in) whose memory it may reuse: the int8 values are
    written over the start of that memory, so a layer's 4-bit weights become int8 rows in the working
    copy they were dequantized into, with no second buffer. `w`'s rows are contiguous, or its
    columns are (compression.dequantize's layout for groups along the output dim); rows of either
    may be padded apart. The values keep that orientation. Same numbers as `quantize`.

    Safe in place: a run of rows is converted into a temporary before it is written, and the int8
    rows [r0, r1) land in the bytes of float rows below r1, which are already converted."""
    rows_major = w.stride(1) == 1
    m = w if rows_major else w.t()                 # the memory, row by row (rows may be padded apart)
    if w.dtype != torch.float32 or m.stride(1) != 1 or m.stride(0) < m.shape[1]:
        raise ValueError("quantize_over takes a float32 weight laid out by rows, or the transpose of one")
    per = max(1, CHUNK_ELEMS // m.shape[1])
    chunks = range(0, m.shape[0], per)
    if rows_major:
        scale = torch.cat([m[r0:r0 + per].abs().amax(dim=1) for r0 in chunks])
    else:
        scale = m.new_zeros(m.shape[1])
        for r0 in chunks:
            torch.maximum(scale, m[r0:r0 + per].abs().amax(dim=0), out=scale)
    scale = scale.clamp_min_(1e-30).div_(127.0)                              # (out,)
    q = torch.empty(0, dtype=torch.int8, device=m.device).set_(    # packed int8 rows from m's first byte
        m.untyped_storage(), m.storage_offset() * m.element_size(), m.shape, (m.shape[1], 1))
    for r0 in chunks:
        s = scale[r0:r0 + per, None] if rows_major else scale
        q[r0:r0 + per] = (m[r0:r0 + per] / s).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q if rows_major else q.t(), scale)


def from_4bit(parts, buf: torch.Tensor) -> Int8Weight | None:
    """A 4-bit weight (compression.QuantizedTensor, 2-D, groups along the output dim) made int8 rows in
    `buf`'s memory by the C kernel (kernels/int8.c), reading the packed values without writing a float32
    copy: the numbers of `quantize_over(compression.dequantize(parts, torch.float32, buf))`.
    None when the kernel cannot take it (no compiler, another layout, not on the CPU): use that then."""
    out_f, in_f = parts.shape if len(parts.shape) == 2 else (0, 0)
    config = parts.config
    fn = kernels.int8_rows_from_4bit()
    if (fn is None or not out_f or config.num_bits != 4 or config.group_dim % 2 != 0 or config.group_size > 512
            or buf.device.type != "cpu" or parts.packed.device.type != "cpu" or not buf.is_contiguous()
            or buf.numel() * buf.element_size() < out_f * in_f or not parts.packed.is_contiguous()):
        return None
    width = -(-out_f // config.group_size) * config.group_size
    q = torch.empty(0, dtype=torch.int8).set_(buf.untyped_storage(), buf.storage_offset() * buf.element_size(),
                                              (in_f, out_f), (out_f, 1))
    scale = torch.empty(out_f, dtype=torch.float32)
    step, minimum = parts.step.float().contiguous(), parts.minimum.float().contiguous()
    fn(parts.packed.data_ptr(), step.data_ptr(), minimum.data_ptr(), in_f, width, out_f, config.group_size,
       q.data_ptr(), scale.data_ptr())
    return Int8Weight(q.t(), scale)


def dequantize(w: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w.values.to(dtype) * w.scale[..., None].to(dtype))


def encode(x: torch.Tensor) -> torch.Tensor:
    """x (n, out, in) float -> uint8 (n, nbytes): each weight's scales, then its values (scales first:
    a row that starts 4-byte aligned keeps the float32 scales aligned whatever the shape)."""
    q = quantize(x)
    n = x.shape[0]
    return torch.cat([q.scale.reshape(n, -1).contiguous().view(torch.uint8),
                      q.values.reshape(n, -1).view(torch.uint8)], dim=1)


def unpack(raw: torch.Tensor, shape) -> Int8Weight:
    """uint8 (nbytes,) or (1, nbytes) -> an Int8Weight viewing those bytes (no copy)."""
    out_f, in_f = shape
    flat = raw.reshape(-1)
    return Int8Weight(flat[out_f * 4: out_f * 4 + out_f * in_f].view(torch.int8).view(out_f, in_f),
                      flat[: out_f * 4].view(torch.float32))


# The last input quantized, and its int8 form: q, k and v (and gate and up) multiply the same input,
# so it is quantized once for them. Keyed on the tensor object itself (held, so a new tensor at the
# same address is never mistaken for it) and its version counter (an in-place change invalidates).
_last = threading.local()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, in) float32 -> (int8 values, float32 scales (rows, 1)), symmetric absmax per row.

    The C kernel (kernels/int8.c) does it in one pass with the same arithmetic, so the same bits."""
    fn = kernels.int8_quantize() if x.device.type == "cpu" else None
    if fn is not None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        values = torch.empty(rows, cols, dtype=torch.int8)
        scale = torch.empty(rows, 1, dtype=torch.float32)
        fn(x.data_ptr(), rows, cols, x.stride(0), values.data_ptr(), scale.data_ptr())
        return values, scale
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127.0)
    return torch.div(x, scale).round_().to(torch.int8), scale


def scale_sums(sums: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """int32 sums (rows, out) of an int8 product -> float32 (sums * w_scale) * a_scale (+ bias),
    written over the sums' own memory by the C kernel (one pass), or in torch's passes without it."""
    fn = kernels.int8_scale()
    if (fn is not None and sums.is_contiguous() and w_scale.is_contiguous() and a_scale.is_contiguous()
            and (bias is None or bias.dtype == torch.float32)):
        bias = None if bias is None else bias.contiguous()
        fn(sums.data_ptr(), sums.shape[0], sums.shape[1], w_scale.data_ptr(), a_scale.data_ptr(),
           None if bias is None else bias.data_ptr())
        return sums.view(torch.float32)
    y = sums.to(torch.float32).mul_(w_scale).mul_(a_scale)
    return y.add_(bias) if bias is not None else y


def linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequantize(w).T + bias, computed as an int8 product (module docstring)."""
    if x.device.type != "cpu":          # (CUDA's int8 product wants M > 16 and multiples of 8: not wired)
        return torch.nn.functional.linear(x, dequantize(w, x.dtype), bias)
    rows = x.numel() // x.shape[-1]
    key = getattr(_last, "key", None)
    if key is not None and key[0] is x and key[1] == x._version:
        xq, a_scale = _last.value
    else:
        xq, a_scale = quantize_rows(x.reshape(rows, x.shape[-1]).float())
        _last.key, _last.value = (x, x._version), (xq, a_scale)
    y = scale_sums(torch._int_mm(xq, w.values.t()), w.scale, a_scale, bias)
    return y.view(*x.shape[:-1], w.values.shape[0]).to(x.dtype)


def forget() -> None:
    """Drop the cached quantized input (its memory), e.g. at the end of a generate call."""
    _last.key = _last.value = None
