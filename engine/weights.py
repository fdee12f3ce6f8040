"""Weight store: read a checkpoint once, home each tensor on a tier, serve a layer's weights.

Checkpoints are Hugging Face directories with `*.safetensors` (read tensor by tensor with pread) or
`pytorch_model*.bin` (read with `weights_only=True`), sharded or not. `DummyWeights` makes random
weights layer by layer for benchmarks of sizes that have no checkpoint here.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import math
import os
import weakref
from pathlib import Path

import torch

from .config import CheckpointError, ModelConfig
from .models import WeightSpec, family
from .placement import Precision, TensorPlan, plan_layer, tier_at
from .policy import Policy
from .pools import BufferPool
from .tiers import TierArray, Tiers
from .transfer import SharedStaging, WeightLoad


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """A .safetensors file read one tensor at a time with pread into memory of its own.

    Not memory-mapped: the pages of a mapping count in the process's RSS for as long as it lives,
    which would make the checkpoint's file size (OPT-1.3b: 2.5 GiB) part of the engine's peak RSS
    while it loads; a read tensor is freed once it is placed. Format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        try:
            meta = json.loads(os.pread(self.fd, n, 8))
        except ValueError as e:
            raise ValueError(f"the header is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"the header is a JSON {type(meta).__name__}, not an object")
        meta.pop("__metadata__", None)
        self.data_start = 8 + n
        for name, m in meta.items():
            _check_entry(name, m, size - self.data_start)
        self.meta = meta

    def keys(self) -> list[str]:
        return list(self.meta)

    def get_tensor(self, name: str) -> torch.Tensor:
        m = self.meta[name]
        begin, end = m["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[m["dtype"]]
        if end == begin:
            return torch.empty(m["shape"], dtype=dtype)
        buf = bytearray(end - begin)
        if os.preadv(self.fd, [buf], self.data_start + begin) != len(buf):
            raise ValueError(f"{name}: short read")
        return torch.frombuffer(buf, dtype=dtype).reshape(m["shape"])


def _check_entry(name: str, m, data_bytes: int) -> None:
    """A header entry names a dtype this engine reads, a shape of sizes >= 0, and exactly the bytes
    that shape needs, inside the file's `data_bytes` of data: nothing is read or allocated otherwise."""
    if not isinstance(m, dict) or not {"dtype", "shape", "data_offsets"} <= set(m):
        raise ValueError(f"{name}: the header entry {m!r} lacks dtype, shape or data_offsets")
    shape, offsets = m["shape"], m["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise ValueError(f"{name}: data_offsets {offsets!r} is not a pair of byte offsets")
    if m["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: dtype {m['dtype']!r} is not one this engine reads "
                         f"({', '.join(_SAFETENSORS_DTYPES)})")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise ValueError(f"{name}: data at bytes {begin}-{end} lies past the end of the file "
                         f"({data_bytes} bytes of data)")
    want = math.prod(shape) * _SAFETENSORS_DTYPES[m["dtype"]].itemsize
    if end - begin != want:      # e.g. empty offsets for a non-empty shape: uninitialised weights
        raise ValueError(f"{name}: shape {shape} of {m['dtype']} needs {want} bytes, the header gives {end - begin}")


class Checkpoint:
    """Tensors of a local Hugging Face checkpoint, read lazily by name."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{directory}: not a directory; pass a local checkpoint folder")
        self.where: dict[str, Path] = {}
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{self.dir}: no weights found (expected *.safetensors or "
                                  "pytorch_model*.bin); save the model with save_pretrained() into it")
        self._open: dict[Path, object] = {}
        for f in files:
            for name in self._keys(f):
                self.where[name] = f

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    self._open[f] = SafetensorsFile(f)
                else:
                    self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # safetensors and torch raise many kinds for a bad file
                raise CheckpointError(f"{f}: cannot read this weight file ({type(e).__name__}: {e}); "
                                      "it is corrupt or truncated: re-save or re-download it") from e
        return self._open[f]

    def _keys(self, f: Path):
        h = self._handle(f)
        return list(h.keys())

    def check(self, name: str, shape: tuple) -> None:
        """CheckpointError unless the checkpoint holds `name` with this shape: from the headers alone,
        so that a config.json claiming sizes the files do not hold allocates nothing."""
        if name not in self.where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint; is it "
                                  "a checkpoint of the model its config.json describes?")
        h = self._handle(self.where[name])
        held = h.meta[name]["shape"] if isinstance(h, SafetensorsFile) else h[name].shape
        if tuple(held) != tuple(shape):
            raise CheckpointError(f"{self.where[name]}: tensor {name!r} has shape {tuple(held)}, config.json "
                                  f"implies {tuple(shape)}; the weights and config.json are of different models")

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        self.check(name, shape)
        h = self._handle(self.where[name])
        try:
            return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        except Exception as e:
            raise CheckpointError(f"{self.where[name]}: cannot read {name!r} ({e}); the file is corrupt") from e


class DummyWeights:
    """Deterministic random weights, made on demand (for benchmarks without a checkpoint)."""

    def check(self, name: str, shape: tuple) -> None:
        pass

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        if "norm" in name and name.endswith("weight") and len(shape) == 1:
            return torch.ones(shape)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g).mul_(0.02)


_M_MMAP_THRESHOLD = -3          # glibc mallopt parameter


@contextlib.contextmanager
def unmapped_on_free(threshold: int = 1 << 20):
    """Inside: glibc serves allocations of `threshold` bytes or more with mmap, so each goes back to
    the OS when freed. Loading makes a few transient copies of every tensor (read, widened, rounded);
    glibc's default raises that bar to 32 MB after the first large free and keeps the rest in its
    heap (loading OPT-1.3b, 5.3 GiB of weights, that leaves 2 GiB of freed copies in RSS: 7.4 GiB
    against 5.5 GiB with this threshold). After: a fixed 32 MB, the default's own ceiling, so that generation's
    activations reuse heap memory instead of faulting in fresh pages. No-op off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def checkpoint_shapes(config: ModelConfig):
    """(checkpoint name, shape) of every tensor a model of `config` reads, layer by layer (a tied
    head names the embedding again)."""
    fam = family(config.family)
    yield from ((s.hf_name, s.shape) for s in fam.layer_weights(config, "embed"))
    for i in range(config.num_layers):
        for kind in ("attn", "mlp"):
            yield from ((s.hf_name, s.shape) for s in resolve_names(fam.layer_weights(config, kind), i))
    yield from ((s.hf_name, s.shape) for s in fam.layer_weights(config, "head"))


def resolve_names(specs: list[WeightSpec], index: int) -> list[WeightSpec]:
    return [WeightSpec(s.name, s.hf_name.format(i=index), s.shape) for s in specs]


class LayerWeights:
    """One layer's weights, each homed on one tier in that tier's format, with the plan it was
    placed by (engine/placement.py): name -> (array, plan)."""

    def __init__(self, tiers: Tiers, arrays: dict[str, TierArray], plans: dict[str, TensorPlan]):
        self.tiers, self.arrays, self.plans = tiers, arrays, plans

    def load(self, pool: BufferPool, packed: bool = False) -> WeightLoad:
        """Read the layer for the compute device (on the I/O thread): a `WeightLoad` that owns what
        the read borrowed; finish it on the computing thread and close it (a `with` block) once the
        layer is done (engine/transfer.py). `packed`: the steps will multiply 2-D 4-bit weights
        packed, so those borrow only `compression.linear`'s scratch (TensorPlan.borrow)."""
        return WeightLoad(self, pool, packed)

    def read_shared(self) -> tuple[dict[str, torch.Tensor], SharedStaging | None]:
        """Every disk-homed tensor of the layer in one read of the file they share (place_layer):
        {name: its bytes (1, row_bytes)}, viewing one staging buffer, and that buffer's holds."""
        files = {id(a.file): a.file for a in self.arrays.values() if a.file is not None}
        if len(files) != 1 or sum(a.file is not None for a in self.arrays.values()) < 2:
            return {}, None
        (f,) = files.values()
        raw, buf = f.read_rows(0, 1)
        whole = raw[0]
        raws = {name: whole[a.base: a.base + a.row_bytes].view(1, -1)
                for name, a in self.arrays.items() if a.file is f}
        return raws, SharedStaging(buf)

    def working_bytes(self, packed: bool = False) -> int:
        """Bytes a load borrows on the compute device (for weights not compute-ready there)."""
        return sum(self.plans[name].working_bytes(a.tier, packed) for name, a in self.arrays.items())

    def bytes_on(self, tier: str) -> int:
        return sum(a.nbytes for a in self.arrays.values() if a.tier == tier)

    def close(self):
        for a in self.arrays.values():
            a.close()


def place_layer(tiers: Tiers, policy: Policy, source, specs: list[WeightSpec], label: str,
                storage: torch.dtype, placed: dict[str, TierArray] | None = None,
                matmul: bool = False) -> LayerWeights:
    """Read a layer's tensors from `source` and home each on the tier and in the format its
    `TensorPlan` names. The disk-homed ones share one file, each at an aligned offset, so that
    loading the layer is one read: small tensors pay a request's latency each (SmolLM2-135M's 4-bit
    layers are 4-5 tensors of 0.1-0.5 MB, and one read a layer loads them measurably faster than
    one read a tensor).

    `placed` maps checkpoint names to arrays placed by earlier layers (and gets this layer's): a
    tensor already there of the same shape is shared, not stored again, wherever it lives. That is
    a tied LM head, which names the embedding (SmolLM2-135M: 54 of its 311 MiB of fp16 weights).
    `matmul`: the layer is a decoder layer (attention, MLP), whose 2-D weights only `ops.linear` reads."""
    placed = {} if placed is None else placed
    for spec in specs:                         # before anything is allocated for them
        source.check(spec.hf_name, spec.shape)
    precision = Precision.of(policy, tiers.compute_device.type, storage)
    # where an earlier layer holds a tensor is its array's business: the plan only needs to know it is tied
    plans = plan_layer(specs, precision, matmul, {(hf, a.shape): None for hf, a in placed.items()})
    homes = [tier_at(p.mid, policy.percents("w")) if not p.tied else None for p in plans]
    spans = [p.stored_bytes("disk") if tier == "disk" else 0 for p, tier in zip(plans, homes)]
    shared = tiers.new_file(f"{label}.weights", sum(spans), 1) if sum(map(bool, spans)) > 1 else None
    arrays = {}
    try:
        for spec, plan, tier, base in zip(specs, plans, homes, itertools.accumulate([0] + spans)):
            if plan.tied:
                arrays[spec.name] = placed[spec.hf_name]
                continue
            t = source.get(spec.hf_name, spec.shape)
            span = (shared, base) if shared is not None and tier == "disk" else None
            arr = TierArray(tiers, tier, plan.format(tier), spec.shape, 1, f"{label}.{spec.name}", span)
            arrays[spec.name] = arr
            arr.write(0, t.to(torch.float32)[None])
            placed[spec.hf_name] = arr
    except BaseException:
        for spec, plan in zip(specs, plans):
            if spec.name in arrays and not plan.tied:
                arrays[spec.name].close()
        raise
    finally:
        if shared is not None:
            shared.close()                     # the arrays hold it now
    return LayerWeights(tiers, arrays, {p.name: p for p in plans})
