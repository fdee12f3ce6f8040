"""A GGUF file checked before the converter reads or allocates anything on its word.

`gguf.GGUFReader` trusts the file: a count or a size in the header decides how much it walks, views
and (through `dequantize`) allocates, and a malformed field ends in IndexError, a truncated view, a
wrapped-around element count or a hang, not in an error that says what is wrong. So `check_layout`
walks the header first, with every count and size bounded by the bytes the file has left, and
`check_tensors` holds the tensor list against the shapes the model's own config implies. Both raise
CheckpointError naming the file and the problem.
"""
from __future__ import annotations

import mmap
import struct
from functools import lru_cache
from pathlib import Path

from .config import CheckpointError

MAX_DIMS = 4                     # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32           # GGUF_DEFAULT_ALIGNMENT
# GGUFReader keeps two numpy objects (about 200 bytes) per metadata array item, so a few MB of one-byte
# items would cost GBs; real files hold under a million (vocabularies of 256k tokens, types and merges)
MAX_METADATA_ITEMS = 1 << 21
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_CONVERT = "re-quantize the model with llama.cpp to a type it reads (F32, F16, BF16, Q4_0 .. Q8_0, K-quants, IQ-quants)"
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8      # the smallest entries: key, type, a byte; name, dims, ...


class _Layout:
    """A cursor over the file's bytes whose reads never pass its end."""

    def __init__(self, path: Path, data: mmap.mmap, order: str):
        self.path, self.data, self.order, self.offs, self.items = path, data, order, 0, 0

    def fail(self, problem: str, hint: str = "the GGUF file is truncated or corrupt: fetch it again"):
        return CheckpointError(f"{self.path}: {problem}; {hint}")

    def take(self, n: int, what: str) -> int:
        """Skip n bytes; their offset."""
        if n < 0 or self.offs + n > len(self.data):
            raise self.fail(f"{what} at byte {self.offs} needs {n} bytes, past the end of the file "
                            f"({len(self.data)} bytes)")
        start, self.offs = self.offs, self.offs + n
        return start

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(self.order + fmt, self.data, self.take(size, what))[0]

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", f"the length of {what}")
        return bytes(self.data[self.take(n, what): self.offs])

    def value(self, vtype: int, what: str):
        """Skip one metadata value of type `vtype`; scalars and strings are returned, arrays not."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has value type {vtype}, which GGUF does not define")
        itype, count = self.scalar("I", what), self.scalar("Q", what)
        item = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8     # a string's length at least
        if count * item > len(self.data) - self.offs:
            self.take(count * item, f"{what}'s {count} items")
        self.items += count
        if self.items > MAX_METADATA_ITEMS:
            raise self.fail(f"{what} brings the metadata to {self.items} array items; a model's metadata "
                            f"holds under {MAX_METADATA_ITEMS}")
        if itype in _SCALARS:
            self.take(count * item, what)
        else:
            for _ in range(count):
                self.value(itype, what)
        return None


def check_layout(path: Path) -> None:
    """CheckpointError unless the header of the GGUF file at `path` is well formed and every tensor it
    lists has a type the converter dequantizes, sizes >= 1 and its data inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF header; fetch the file again")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if data[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it starts with {bytes(data[:4])!r}, not b'GGUF')")
        (version,) = struct.unpack_from("<I", data, 4)
        order = ">" if version & 0xFFFF == 0 else "<"          # a file written on a big-endian machine
        cur = _Layout(path, data, order)
        cur.take(4, "the magic")
        version = cur.scalar("I", "the version")
        if version not in (2, 3):
            raise cur.fail(f"GGUF version {version}; the converter reads versions 2 and 3", _CONVERT)
        n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
        if n_tensors * _MIN_TENSOR + n_kv * _MIN_KV > size - cur.offs:
            raise cur.fail(f"the header lists {n_tensors} tensors and {n_kv} metadata entries, more than the "
                           f"{size - cur.offs} bytes after it can hold")
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            what = f"metadata {key[:80].decode(errors='replace')!r}"
            value = cur.value(cur.scalar("I", what), what)
            if key == b"general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1):
                    raise cur.fail(f"general.alignment {value!r} is not a power of two")
                alignment = value
        tensors, names = [], set()
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}").decode(errors="replace")
            if name in names:
                raise cur.fail(f"tensor {name!r} is listed twice")
            names.add(name)
            n_dims = cur.scalar("I", f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
            dims = [cur.scalar("Q", f"tensor {name!r}") for _ in range(n_dims)]
            tensors.append((name, dims, cur.scalar("I", f"tensor {name!r}"), cur.scalar("Q", f"tensor {name!r}")))
        start = -(-cur.offs // alignment) * alignment
        for name, dims, type_id, offset in tensors:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise cur.fail(f"tensor {name!r} has type {type_id}, which GGUF does not define") from None
            if not _dequantizable(qtype):
                raise cur.fail(f"tensor {name!r} is {qtype.name}, a type the converter cannot dequantize", _CONVERT)
            if any(d < 1 or d >= 1 << 63 for d in dims):
                raise cur.fail(f"tensor {name!r} has dimensions {dims}; each must be at least 1 and below 2^63")
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise cur.fail(f"tensor {name!r} has rows of {dims[0]} values, not whole {qtype.name} blocks "
                               f"of {block}")
            n = 1
            for d in dims:
                n *= d
            nbytes = n // block * type_size
            begin = start + offset
            if offset % alignment or begin + nbytes > size:
                where = "past the end of the file" if begin + nbytes > size else f"not aligned to {alignment}"
                raise cur.fail(f"tensor {name!r} ({qtype.name}, dimensions {dims}) has its {nbytes} bytes at byte "
                               f"{begin}, {where} ({size} bytes)")
    finally:
        data.close()


@lru_cache(maxsize=None)
def _dequantizable(qtype) -> bool:
    """Whether gguf.quants dequantizes `qtype` (tried on one zero block)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_tensors(path: Path, reader, config: dict) -> None:
    """CheckpointError unless the file holds exactly the tensors its config implies, each of the shape
    it implies: checked before any is dequantized, so that a claim of huge tensors allocates nothing."""
    from .config import config_from_hf
    from .gguf import hf_tensor_name
    from .weights import checkpoint_shapes

    try:
        model = config_from_hf(config, name=path.name)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the metadata describes no model this engine runs ({e})") from e
    found = {}
    for t in reader.tensors:
        try:
            found[hf_tensor_name(t.name)] = (t.name, tuple(int(d) for d in reversed(t.shape.tolist())))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    expected = set()
    for name, shape in checkpoint_shapes(model):   # lazily: a claim of a billion layers stops at the first gap
        if name not in found:
            raise CheckpointError(f"{path}: tensor for {name} is missing; the metadata describes "
                                  f"{model.num_layers} layers of hidden size {model.hidden_size}")
        gguf_name, held = found[name]
        if held != tuple(shape):
            raise CheckpointError(f"{path}: tensor {gguf_name!r} has shape {held}, the metadata implies "
                                  f"{tuple(shape)}; the file is corrupt or not the model its metadata names")
        expected.add(name)
    extra = sorted(gguf_name for name, (gguf_name, _) in found.items() if name not in expected)
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensors beyond what the metadata describes "
                              f"(e.g. {', '.join(extra[:3])}); the file is corrupt or not the model its metadata names")
