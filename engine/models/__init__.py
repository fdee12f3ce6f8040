"""Model families. Each module exposes the same functions over plain tensors:

    layer_weights(config, kind) -> list[WeightSpec]      kind in embed / attn / mlp / head
    embed(w, ids, positions, config) -> hidden            (b, s, hidden)
    attn_qkv(w, hidden, positions, config) -> q, k, v     q (b, n_head, s, d); k, v (b, n_kv, s, d)
    attn_out(w, hidden, o, config) -> hidden              o (b, n_head, s, d) from ops.attend
    mlp(w, hidden, config) -> hidden
    head(w, hidden, config) -> logits                     hidden (b, hidden) -> (b, vocab)
    ATTN_SCALE                                            the scale ops.attend applies (None = 1/sqrt(d))

`w` is a dict from the WeightSpec names to compute-ready tensors; the tables in LOOKUP_TABLES may
come as a still-quantized QuantizedTensor, which `embed` reads through `ops.embedding`. Weight
names are per layer; `hf_name` templates carry `{i}` for the layer index.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType


LOOKUP_TABLES = frozenset({"embed_tokens", "embed_positions"})   # tables `embed` only indexes rows of


@dataclass(frozen=True)
class WeightSpec:
    name: str          # the key the family's functions read, e.g. "q_proj.weight"
    hf_name: str       # the checkpoint key, with {i} for the decoder layer index
    shape: tuple       # the shape in the checkpoint


def family(name: str) -> ModuleType:
    """The module that implements a model family ("opt", "llama" or "qwen2")."""
    from . import llama, opt, qwen2
    return {"opt": opt, "llama": llama, "qwen2": qwen2}[name]
