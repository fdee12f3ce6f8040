"""Byte formats: how float data is held on a tier, as rows of raw bytes.

A `Format` turns a float tensor of n rows into a uint8 tensor (n, row_bytes) and back, so that
every tier (a device tensor, a CPU tensor, rows of a disk file) stores the same bytes. On the
compute device plain data is kept compute-ready (float32 on a CPU, with values rounded through the
storage dtype first, so that every tier yields identical numbers); on CPU and disk it is kept in
the storage dtype (float16 by default), group-wise quantized, or as int8 rows with scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import int8 as int8_format
from .compression import CompressionConfig, QuantizedTensor, compressed_nbytes, dequantize, padded_shape, quantize


def compute_dtype(device_type: str) -> torch.dtype:
    """The dtype the engine computes in on a device of this type: float16 on CUDA, float32 on a CPU
    (whose matmuls have no fast float16 path)."""
    return torch.float16 if device_type == "cuda" else torch.float32


@dataclass(frozen=True)
class Format:
    """How float data is held on a tier: an element dtype, optional rounding, optional quantization."""

    dtype: torch.dtype                       # element dtype held (plain formats)
    round_to: torch.dtype | None = None      # values pass through this dtype first (storage precision)
    quant: CompressionConfig | None = None   # group-wise quantization instead of plain elements
    int8: bool = False                       # a 2-D weight as int8 rows with scales (engine/int8.py)

    def row_bytes(self, shape: tuple) -> int:
        if self.int8:
            return int8_format.nbytes(shape)
        if self.quant is not None:
            return compressed_nbytes(shape, self.quant)
        return math.prod(shape) * self.dtype.itemsize

    def work_shape(self, shape: tuple) -> tuple:
        """Shape of the compute-form buffer `decode` fills without a copy (4-bit: whole groups)."""
        return tuple(shape) if self.quant is None else padded_shape(shape, self.quant)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, *shape) float -> uint8 (n, row_bytes)."""
        n = x.shape[0]
        if self.int8:
            return int8_format.encode(x)
        if self.quant is None:
            if self.round_to is not None and self.round_to != self.dtype:
                x = x.to(self.round_to)
            return x.to(self.dtype).contiguous().view(torch.uint8).reshape(n, -1)
        q = quantize(x, self._row_config())
        return torch.cat([p.reshape(n, -1).view(torch.uint8) for p in q.parts()], dim=1)

    def decode(self, raw: torch.Tensor, shape: tuple, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (n, row_bytes) -> (n, *shape) in `dtype`: into `out`'s memory when given (use the
        return value: a quantized format may hand back a transposed view of it), else a view when no
        conversion is needed."""
        n = raw.shape[0]
        if self.int8:
            vals = torch.stack([int8_format.dequantize(int8_format.unpack(r, shape), dtype) for r in raw])
            return out.copy_(vals) if out is not None else vals
        if self.quant is None:
            vals = raw.view(self.dtype).view(n, *shape)        # rows may be strided; elements contiguous
            if out is not None:
                return out.copy_(vals)
            return vals if self.dtype == dtype else vals.to(dtype)
        return dequantize(self.unpack(raw, shape, self._row_config()), dtype, out)

    def unpack(self, raw: torch.Tensor, shape: tuple, config: CompressionConfig | None = None):
        """uint8 (n, row_bytes) of a quantized format -> its parts (views when `raw` is contiguous);
        without `config` the rows are one tensor of `shape` (n must be 1). An int8 format gives the
        Int8Weight its one row holds."""
        if self.int8:
            return int8_format.unpack(raw, shape)
        n = raw.shape[0]
        groups = compressed_nbytes(shape, self.quant) // (self.quant.group_size * self.quant.num_bits // 8 + 4)
        packed_w = self.quant.group_size * self.quant.num_bits // 8
        sizes = [groups * packed_w, groups * 2, groups * 2]
        packed, step, minimum = torch.split(raw, sizes, dim=1)
        return QuantizedTensor(packed.contiguous().reshape(n * groups, packed_w),
                               step.contiguous().view(torch.float16).reshape(n * groups, 1),
                               minimum.contiguous().view(torch.float16).reshape(n * groups, 1),
                               (n, *shape) if config is not None else tuple(shape), config or self.quant)

    def _row_config(self) -> CompressionConfig:
        # the row dimension n comes first, so a group_dim counted from the front moves by one
        q = self.quant
        gd = q.group_dim + 1 if q.group_dim >= 0 else q.group_dim
        return CompressionConfig(q.num_bits, q.group_size, gd, q.symmetric)
