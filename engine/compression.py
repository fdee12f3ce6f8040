"""Group-wise min-max quantization as pure functions (FlexGen §4, with the NaN defect fixed).

A tensor is cut into groups of `group_size` contiguous values along `group_dim`; each group keeps
its minimum and its step (max - min) / (2^bits - 1) in float16, and each value becomes an integer
in [0, 2^bits - 1]; 4-bit values are packed two per byte (the first half of a group in the low
nibbles, the second half in the high ones, so unpacking writes two contiguous runs). A constant
group has step 0 and comes back exactly. Dimensions that are not a multiple of the group size are padded with the last value
(so padding never widens a group's range) and cut off again on the way back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import kernels


@dataclass(frozen=True)
class CompressionConfig:
    num_bits: int = 4        # 4 packs two values per byte; 8 keeps one per byte
    group_size: int = 64     # values per group (even)
    group_dim: int = 0       # dimension the groups run along (weights: output dim; cache: head dim = -1)
    symmetric: bool = False  # True: zero-centred groups (min = -max)

    def __post_init__(self):
        if self.num_bits not in (4, 8):
            raise ValueError(f"num_bits={self.num_bits}: only 4 and 8 are supported")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size={self.group_size} must be an even number >= 2")


class QuantizedTensor(NamedTuple):
    packed: torch.Tensor     # uint8 (num_groups, group_size * num_bits / 8)
    step: torch.Tensor       # float16 (num_groups, 1)
    minimum: torch.Tensor    # float16 (num_groups, 1)
    shape: tuple             # the original shape
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.step, self.minimum))

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.step, self.minimum


def quantize(x: torch.Tensor, config: CompressionConfig) -> QuantizedTensor:
    """Quantize `x` group-wise; see the module docstring."""
    shape = tuple(x.shape)
    grouped = _to_groups(x.float(), config)                       # (num_groups, group_size)
    levels = 2 ** config.num_bits - 1
    if config.symmetric:
        bound = grouped.abs().amax(dim=1, keepdim=True)
        lo, hi = -bound, bound
    else:
        lo, hi = grouped.amin(dim=1, keepdim=True), grouped.amax(dim=1, keepdim=True)
    minimum = lo.to(torch.float16)
    # round the step up so that minimum + levels * step still reaches the group's maximum
    step = ((hi - minimum.float()) / levels * (1 + 2 ** -10)).to(torch.float16)
    inv_step = 1.0 / step.float().clamp_min(1e-30)
    q = (grouped - minimum.float()).mul_(inv_step).round_().clamp_(0, levels).to(torch.uint8)
    if config.num_bits == 4:
        half = config.group_size // 2
        q = q[:, :half] | (q[:, half:] << 4)
    return QuantizedTensor(q.contiguous(), step, minimum, shape, config)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `quantize`, in `dtype`, on the device the parts are on.

    With `out` (a contiguous buffer of the original shape, or of `padded_shape` when the group
    dimension is not a multiple of the group size) the values are written into its memory and the
    result is a view of it; when the groups run along another dimension than the last, that view is
    the transpose-free layout (`movedim`), not `out`'s own, so use the return value.
    Every step is one pass over memory in a single dtype: mixed uint8 x float arithmetic and
    transposing copies run 5-10x slower on CPU."""
    packed, step, minimum, shape, config = qt
    dim = config.group_dim % len(shape)
    moved_shape = [s for i, s in enumerate(shape) if i != dim] + [shape[dim]]
    padded = (shape[dim] % config.group_size) != 0
    whole = packed.shape[0] * config.group_size                  # values in whole groups
    if out is not None and out.numel() == whole and out.is_contiguous() and out.dtype == dtype:
        grouped = out.view(-1).view(-1, config.group_size)
    else:
        grouped = torch.empty(packed.shape[0], config.group_size, dtype=dtype, device=packed.device)
    _dequantize_groups(packed, step, minimum, config, grouped)    # (num_groups, group_size)
    if padded:
        n = shape[dim]
        result = grouped.view(*moved_shape[:-1], -1)[..., :n].movedim(-1, dim)
    else:
        result = grouped.view(moved_shape).movedim(-1, dim)
    if out is not None and result.data_ptr() != out.data_ptr():
        return out.copy_(result)
    return result if out is not None else result.contiguous()


# Values dequantized per pass of `_dequantize_groups`: 2 MB of float32 stay in cache between the
# unpack, the scale and the shift, so DRAM sees one write instead of four passes (on OPT-1.3b layer
# shapes about 1.3x the rate of whole tensors); below 2**17 values per-op overhead wins.
CHUNK_ELEMS = 1 << 19


def _dequantize_groups(packed, step, minimum, config: CompressionConfig, grouped: torch.Tensor) -> None:
    """Unpack, scale and shift groups into `grouped` (num_groups, group_size), a cache-sized run at a time."""
    per = max(1, CHUNK_ELEMS // config.group_size)
    half = config.group_size // 2
    for g0 in range(0, packed.shape[0], per):
        g, p = grouped[g0:g0 + per], packed[g0:g0 + per]
        if config.num_bits == 4:
            g[:, :half].copy_(p & 0x0F)
            g[:, half:].copy_(p >> 4)
        else:
            g.copy_(p)
        g.mul_(step[g0:g0 + per].to(g.dtype)).add_(minimum[g0:g0 + per].to(g.dtype))


class QuantizedWeight(NamedTuple):
    """A quantized 2-D weight (out, in) that `linear` multiplies by without dequantizing it whole;
    `scratch` is a float buffer of `scratch_elems` values (more do no harm, fewer cost speed)."""
    parts: QuantizedTensor
    scratch: torch.Tensor


def _lines(shape, config: CompressionConfig) -> tuple[int, int]:
    """(lines, padded width of a line) of a 2-D weight's grouped layout: input rows of the
    transposed weight when the groups run along the output dim, output rows when along the input."""
    out_f, in_f = shape
    n_lines, width = (in_f, out_f) if config.group_dim % 2 == 0 else (out_f, in_f)
    return n_lines, -(-width // config.group_size) * config.group_size


def scratch_elems(shape, config: CompressionConfig) -> int:
    """Float values of scratch `linear` dequantizes into on the torch path for a 2-D weight of
    `shape`: a cache-sized run of whole lines (one line at the least, the whole padded weight at most)."""
    n_lines, padded_width = _lines(shape, config)
    return max(1, min(n_lines, CHUNK_ELEMS // padded_width)) * padded_width


# Most rows the C kernel (engine/kernels/qlinear.c) takes for a weight used once (one micro-batch).
# The alternative dequantizes the whole weight and then runs one MKL matmul, which streams the float
# copy from DRAM; the kernel reads the packed values once and needs no float copy in memory. The
# kernel's time grows with the rows and the alternative's dequantization does not, so there is a
# crossing: at OPT-1.3b's fc1 the kernel stays ahead up to about 256 rows on both AVX2 and AVX-512
# CPUs (docs/benchmarks.md, "How many rows the 4-bit kernel takes").
KERNEL_MAX_ROWS = 256
# Several micro-batches of a block can share one dequantized copy, each then paying only the matmul,
# which beats the kernel from about 64 rows on. The limits are constants rather than timed at run
# time: the kernel and MKL round differently, so choosing by timing would make the tokens depend on
# the machine's load.
SHARED_MAX_ROWS = 64


def kernel_takes(config: CompressionConfig) -> bool:
    """Whether the C kernel is built and takes weights quantized this way (4-bit, groups along the
    output dim of a 2-D weight)."""
    return config.num_bits == 4 and config.group_dim % 2 == 0 and kernels.qlinear() is not None


def use_kernel(rows: int, qt: QuantizedTensor, x: torch.Tensor | None = None) -> bool:
    """Whether `linear` multiplies `rows` rows by `qt` in the C kernel."""
    return (rows <= KERNEL_MAX_ROWS and len(qt.shape) == 2 and qt.packed.device.type == "cpu"
            and qt.packed.is_contiguous() and (x is None or x.dtype == torch.float32) and kernel_takes(qt.config))


def multiply_packed(rows: int, micro_batches: int, config: CompressionConfig, on_cpu: bool = True) -> bool:
    """Whether a layer's 4-bit weights used by `micro_batches` micro-batches of `rows` rows each are
    best multiplied straight from the packed values (`linear`) rather than dequantized whole once.
    Only for few rows (a prefill of hundreds of rows is compute-bound, and MKL on the whole float
    weight is fastest there): with the C kernel, up to KERNEL_MAX_ROWS for one micro-batch and
    SHARED_MAX_ROWS for several (see there); on the torch path, up to SHARED_MAX_ROWS when one
    micro-batch uses them (each value is converted once either way, in cache instead of through DRAM).
    `config`: how the weights are quantized (the kernel takes only some formats); `on_cpu`: whether
    they are multiplied on the CPU (the kernel's only device)."""
    if on_cpu and kernel_takes(config):
        return rows <= (KERNEL_MAX_ROWS if micro_batches == 1 else SHARED_MAX_ROWS)
    return rows <= SHARED_MAX_ROWS and micro_batches == 1


def linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x (rows, in) @ dequantize(weight).T, one cache-sized run of groups at a time: each run is
    dequantized into the scratch buffer and multiplied while it is still in cache, so the float
    weight never goes to DRAM. For one micro-batch this does the work of `dequantize` at cache speed
    (OPT-1.3b layer shapes, 2 rows: 47 ms against 55 ms for `dequantize` alone plus 34 ms for the
    matmul). Each use dequantizes again, so it pays only when a weight is used once per load.
    Up to KERNEL_MAX_ROWS rows of a 4-bit weight grouped along its output dim go to the C kernel,
    which never writes the float weight at all.

    Runs are whole lines of the grouped layout: input rows of the transposed weight when the groups
    run along the output dim (partial products, summed), output rows when they run along the input."""
    packed, step, minimum, shape, config = weight.parts
    out_f, in_f = shape
    along_out = config.group_dim % 2 == 0
    n_lines, padded_width = _lines(shape, config)
    if use_kernel(x.shape[0], weight.parts, x):
        y = x.new_empty(x.shape[0], out_f)
        x, step, minimum = x.contiguous(), step.float().contiguous(), minimum.float().contiguous()
        if kernels.qlinear()(packed.data_ptr(), step.data_ptr(), minimum.data_ptr(), x.data_ptr(), y.data_ptr(),
                             x.shape[0], in_f, out_f, config.group_size, packed.shape[0] // in_f,
                             torch.get_num_threads()) == 0:
            return y
    per_line = packed.shape[0] // n_lines                         # groups per line
    width = out_f if along_out else in_f
    lines = max(1, min(scratch_elems(shape, config), weight.scratch.numel()) // padded_width)
    y = x.new_empty(x.shape[0], out_f)
    for l0 in range(0, n_lines, lines):
        l1 = min(n_lines, l0 + lines)
        g0, g1 = l0 * per_line, l1 * per_line
        grouped = weight.scratch.view(-1)[: (g1 - g0) * config.group_size].view(-1, config.group_size)
        _dequantize_groups(packed[g0:g1], step[g0:g1], minimum[g0:g1], config, grouped)
        w = grouped.view(l1 - l0, padded_width)[:, :width]
        if not along_out:                                         # w: output rows l0..l1 of the weight
            y[:, l0:l1] = torch.nn.functional.linear(x, w)
        elif l0 == 0:                                             # w: input rows l0..l1 of weight.T
            torch.mm(x[:, l0:l1], w, out=y)
        else:
            y.addmm_(x[:, l0:l1], w)
    return y


def gather_rows(qt: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize(qt)[rows]` for a 2-D tensor, touching only the groups that hold those rows: an
    embedding lookup from a compressed table costs a few rows, not the whole vocabulary."""
    packed, step, minimum, shape, config = qt
    if len(shape) != 2:
        raise ValueError(f"gather_rows takes a 2-D tensor, got shape {shape}")
    flat = rows.reshape(-1).to(packed.device)
    n_rows, n_cols = shape
    gs = config.group_size
    if config.group_dim % 2 == 1:            # groups run along a row: dequantize that row's groups
        per_row = packed.shape[0] // n_rows
        idx = (flat[:, None] * per_row + torch.arange(per_row, device=packed.device)).reshape(-1)
        part = QuantizedTensor(packed[idx], step[idx], minimum[idx], (flat.numel(), per_row * gs), config)
        out = dequantize(part, dtype)[:, :n_cols]
    else:                                    # groups run down the columns: pick one value per group
        per_col = packed.shape[0] // n_cols
        idx = torch.arange(n_cols, device=packed.device) * per_col + (flat // gs)[:, None]   # (n, cols)
        pos = (flat % gs)[:, None]
        if config.num_bits == 4:
            half = gs // 2
            q = (packed[idx, pos % half] >> ((pos >= half) * 4).to(torch.uint8)) & 0x0F
        else:
            q = packed[idx, pos]
        # the same operations in the same order as dequantize, so the values are bit-identical
        out = q.to(dtype).mul_(step[idx, 0].to(dtype)).add_(minimum[idx, 0].to(dtype))
    return out.reshape(*rows.shape, n_cols)


def padded_shape(shape, config: CompressionConfig) -> tuple:
    """`shape` with the group dimension rounded up to whole groups: the size of a buffer that
    `dequantize` fills without a copy (it returns a view of the unpadded part)."""
    dim = config.group_dim % len(shape)
    return tuple(-(-s // config.group_size) * config.group_size if i == dim else s for i, s in enumerate(shape))


def compressed_nbytes(shape, config: CompressionConfig) -> int:
    """Bytes `quantize` would produce for a tensor of `shape` (packed values + fp16 step and min)."""
    dim = config.group_dim % len(shape)
    n = shape[dim]
    groups_per_row = -(-n // config.group_size)
    rows = 1
    for i, s in enumerate(shape):
        if i != dim:
            rows *= s
    num_groups = rows * groups_per_row
    return num_groups * (config.group_size * config.num_bits // 8 + 4)


def _to_groups(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    moved = x.movedim(config.group_dim % x.dim(), -1)             # (..., n)
    pad = (-moved.shape[-1]) % config.group_size
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    return moved.reshape(-1, config.group_size)

