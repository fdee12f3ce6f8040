"""Shared math over plain tensors: linear, norms, rotary embeddings, attention, masks, sampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import compression, int8, kernels
from .compression import QuantizedTensor, QuantizedWeight, gather_rows


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; `weight` is a tensor, a QuantizedWeight (dequantized as it multiplies,
    `compression.linear`) or an Int8Weight (an int8 product, `int8.linear`). On CPU with 2..512 rows `weight @ x.T` beats MKL's small-M path (OPT-1.3b
    shapes, weights streamed from memory: 1.1-2.4x faster at 33..256 rows, never slower up to 512),
    except for a transposed weight (a dequantized 4-bit weight grouped along its output dimension is
    a column-major view) below 16 rows: that case falls into a slow kernel (8192 x 2048, 2 rows:
    229 ms against 8 ms through F.linear)."""
    rows = x.numel() // x.shape[-1]
    if isinstance(weight, int8.Int8Weight):
        return int8.linear(x, weight, bias)
    if isinstance(weight, QuantizedWeight):
        out = compression.linear(x.reshape(rows, -1), weight).view(*x.shape[:-1], -1)
        return out + bias if bias is not None else out
    if x.device.type == "cpu" and 2 <= rows <= 512 and (rows >= 16 or weight.is_contiguous()):
        out = (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


# Rows per piece in `by_rows`: SmolLM2's MLP intermediate (1024 x 1536 floats, 6 MB) then stays in
# the 32 MB L3 between the matmul and the activation. Not used for OPT: with its 4x wider and 4x
# larger matmuls, pieces measured within noise of whole (OPT-1.3b MLP, 2048 rows: 1.46 s whole,
# 1.40 / 1.51 / 1.39 s in pieces of 2048 / 1024 / 512).
ROWS_PER_PIECE = 1024


def by_rows(x: torch.Tensor, fn) -> torch.Tensor:
    """fn(x) for a row-wise fn (each output row depends on its input row only), computed
    ROWS_PER_PIECE rows at a time. A prefill of a whole micro-batch makes intermediates of tens of
    MB whose elementwise passes (SiLU, products, residual adds) then run from DRAM; in pieces they
    run from cache (SmolLM2-135M, 16 x 256-token prefill: about 10.5 s whole, 9.5-10 s in pieces)."""
    rows = x.numel() // x.shape[-1]
    if rows <= ROWS_PER_PIECE:
        return fn(x)
    flat = x.reshape(rows, x.shape[-1])
    return torch.cat([fn(part) for part in flat.split(ROWS_PER_PIECE)]).view(*x.shape[:-1], -1)


def embedding(table, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an embedding table, plain or still quantized (placement.TensorPlan.lookup)."""
    if isinstance(table, QuantizedTensor):
        return gather_rows(table, ids)
    return table[ids]


def layer_norm(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps: float):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded sequences: 0 at each first real token; pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (b, s)


def attention_mask_bias(attention_mask: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
    """Additive mask (b, 1, q_len, k_len): causal over the last q_len keys plus key padding.

    Masked entries get the dtype's minimum, not -inf, so a fully masked row (a padding query)
    yields finite values instead of NaN.
    """
    b, k_len = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :]                             # (b, 1, 1, k)
    q_pos = torch.arange(k_len - q_len, k_len, device=attention_mask.device)
    causal = q_pos[:, None] >= torch.arange(k_len, device=attention_mask.device)[None, :]
    keep = keep & causal[None, None]                                           # (b, 1, q, k)
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~keep, torch.finfo(dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bias: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q (b, n_head, s, d); k, v (b, n_kv, t, d); mask_bias (b, 1, s, t) -> (b, n_head, s, d)
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # enable_gqa: SDPA shares each kv head among its query heads itself (7-13% faster here than
    # folding the query heads into the rows, for SmolLM2's 9 query / 3 kv heads)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def attend_segments(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]],
                    mask_bias: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention over keys held in pieces, e.g. [shared prefix | own past | new tokens], without
    concatenating them: scores per piece, one softmax over all, then the pieces' weighted values summed.

    q (b, n_head, s, d); each segment k, v (b or 1, n_kv, t_i, d) -- batch 1 means shared by every
    sequence (a common prefix), multiplied once for the whole batch; mask_bias (b, 1, s, sum t_i).
    For one new token per sequence (decode), copying the past into one tensor every layer and step
    costs as much memory traffic as the attention itself, and the scores are small: the pieces are
    read once each. For longer queries (a prefill after a shared prefix) the scores would be the
    big tensor, so the pieces are concatenated for SDPA, which never materializes them (measured
    here: 16 x 115 queries over 596 + 115 keys, 250 ms as segments against 98 ms concatenated; one
    query over 700 keys, 6 ms against 29 ms).
    """
    b, nh, s, d = q.shape
    if len(segments) == 1 or s > 1:
        k, v = (torch.cat([seg[i].expand(b, -1, -1, -1) for seg in segments], dim=2) if len(segments) > 1
                else segments[0][i].expand(b, -1, -1, -1) for i in (0, 1))            # (b, nkv, t, d)
        return attend(q, k, v, mask_bias, scale)
    nkv = segments[0][0].shape[1]
    g = nh // nkv
    rows = g * s                                                     # query rows per kv head
    qg = q.reshape(b, nkv, rows, d) * (1.0 / math.sqrt(d) if scale is None else scale)

    def per_batch(x, y):                                             # x (b, nkv, rows, .), y (1|b, nkv, ., .)
        if y.shape[0] == b:
            return x @ y
        flat = x.transpose(0, 1).reshape(nkv, b * rows, x.shape[-1])  # every sequence against the one y
        return (flat @ y[0]).view(nkv, b, rows, -1).transpose(0, 1)

    scores = torch.cat([per_batch(qg, k.transpose(-1, -2)) for k, _ in segments], dim=-1)
    bias = mask_bias.repeat(1, 1, g, 1) if g > 1 else mask_bias       # (b, 1, rows, t)
    probs = torch.softmax(scores.add_(bias), dim=-1, dtype=torch.float32).to(q.dtype)
    out, lo = None, 0
    for _, v in segments:
        t = v.shape[2]
        part = per_batch(probs[..., lo: lo + t], v)
        out = part if out is None else out.add_(part)
        lo += t
    return out.reshape(b, nh, s, d)


_rotary_last: tuple = (None, None, None)   # (positions, arguments, tables) of the last call


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None,
                  dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (b, 1, s, head_dim) for the rotate-half convention.

    Every layer of a step asks with the same positions tensor: the last answer is kept (the tensor
    itself is held, so the identity check cannot confuse it with a new tensor at the same address)."""
    global _rotary_last
    args = (positions._version, head_dim, theta, repr(scaling), dtype)
    last = _rotary_last                                   # one read: safe if another thread replaces it
    if last[0] is positions and last[1] == args:
        return last[2]
    tables = _rotary_tables(positions, head_dim, theta, scaling, dtype)
    _rotary_last = (positions, args, tables)
    return tables


def _rotary_tables(positions, head_dim, theta, scaling, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = _scale_inv_freq(inv_freq, scaling or {})
    freqs = positions[..., None].float() * inv_freq.to(positions.device)           # (b, s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                        # (b, s, d)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, s, d) rotated by position; cos, sin (b or 1, 1, s, d) from `rotary_tables`.
    On CPU in float32 the C kernel (kernels/rotary.c) does it in one pass, to the same bits."""
    fn = kernels.rotary() if x.device.type == "cpu" and x.dtype == torch.float32 == cos.dtype else None
    if fn is not None and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous():
        b, h, s, d = x.shape
        out = torch.empty(b, h, s, d, dtype=x.dtype)
        fn(x.data_ptr(), b, h, s, d, x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
           0 if cos.shape[0] == 1 else s * d, out.data_ptr())
        return out
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Next token ids (b,): the most likely of last-position logits (b, vocab)."""
    return logits.argmax(-1)


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (b,) from last-position logits (b, vocab)."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def attend_any(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]], mask_bias: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
    """attend_segments over segments whose dtypes may differ (a CPU-tier fp16 past beside the
    float32 new entries). For one new token on the CPU the C kernel reads them as they are, so
    every cache placement gives the same numbers; otherwise (a prefill after a shared prefix, a
    CUDA device, kernels off) they are converted to one dtype for torch: float32 on the CPU."""
    out = attend_decode(q, segments, mask_bias, scale)
    if out is not None:
        return out
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    segments = [(k.to(q.device, dtype), v.to(q.device, dtype)) for k, v in segments]
    return attend_segments(q.to(dtype), segments, mask_bias.to(dtype), scale)


def attend_decode(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]],
                  mask_bias: torch.Tensor, scale: float | None = None) -> torch.Tensor | None:
    """attend_segments for one query token per sequence on the CPU by the C kernel (attention.c),
    reading each segment's keys and values where they lie, in float32, fp16 or bf16; None when the
    kernel is off or cannot take these tensors (then use attend_segments on float32 copies).

    q (b, n_head, 1, d); each segment k, v (b or 1, n_kv, t_i, d) with the last dim contiguous;
    mask_bias (b, 1, 1, sum t_i). Returns float32 (b, n_head, 1, d)."""
    fn = kernels.attention()
    b, nh, s, d = q.shape
    if fn is None or s != 1 or q.device.type != "cpu":
        return None
    segs = (kernels.Segment * len(segments))()
    keep = []                                            # tensors made contiguous here stay alive
    for i, (k, v) in enumerate(segments):
        if k.device.type != "cpu" or k.dtype not in _KERNEL_DTYPES or k.dtype != v.dtype:
            return None
        if k.stride() != v.stride() or k.stride(-1) != 1:
            k, v = k.contiguous(), v.contiguous()
            keep += [k, v]
        segs[i] = kernels.Segment(k.data_ptr(), v.data_ptr(), k.stride(0) if k.shape[0] > 1 else 0,
                                  k.stride(1), k.stride(2), k.shape[2], _KERNEL_DTYPES[k.dtype])
    nkv = segments[0][0].shape[1]
    qf = q.reshape(b, nh, d).to(torch.float32).contiguous()
    bias = mask_bias.reshape(b, -1).to(torch.float32)
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    out = torch.empty(b, nh, 1, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if fn(qf.data_ptr(), segs, len(segments), bias.data_ptr(), bias.stride(0), out.data_ptr(),
          b, nh, nkv, d, scale) != 0:
        raise MemoryError("decode attention: the kernel could not allocate its scratch")
    return out
