"""Qwen2 family: the Llama math (RMSNorm, rotary, grouped-query attention, SwiGLU) plus biases on the
q, k and v projections, none on o. Rope theta (1e6 for Qwen2.5) and a tied or untied head come from
the config, as for Llama."""
from __future__ import annotations

from ..config import ModelConfig
from . import WeightSpec
from .llama import ATTN_SCALE, _L, attn_out, attn_qkv, embed, head, mlp
from .llama import layer_weights as _llama_layer_weights

__all__ = ["ATTN_SCALE", "layer_weights", "embed", "attn_qkv", "attn_out", "mlp", "head"]   # the family's API


def layer_weights(c: ModelConfig, kind: str) -> list[WeightSpec]:
    specs = _llama_layer_weights(c, kind)
    if kind != "attn" or c.attention_bias:            # attention_bias would already give q/k/v (and o) biases
        return specs
    out = {"q": c.hidden_size, "k": c.kv_dim, "v": c.kv_dim}
    with_bias = []
    for spec in specs:
        with_bias.append(spec)
        p = spec.name.split("_proj.")[0]
        if spec.name.endswith("_proj.weight") and p in out:
            with_bias.append(WeightSpec(f"{p}_proj.bias", _L + f"self_attn.{p}_proj.bias", (out[p],)))
    return with_bias
