"""Llama family: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, tied or untied head."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from . import WeightSpec

ATTN_SCALE = None  # 1 / sqrt(head_dim)

_L = "model.layers.{i}."


def layer_weights(c: ModelConfig, kind: str) -> list[WeightSpec]:
    h, kv, f = c.hidden_size, c.kv_dim, c.ffn_dim
    if kind == "embed":
        return [WeightSpec("embed_tokens", "model.embed_tokens.weight", (c.vocab_size, h))]
    if kind == "attn":
        specs = [WeightSpec("ln.weight", _L + "input_layernorm.weight", (h,))]
        for p, out in (("q", h), ("k", kv), ("v", kv), ("o", h)):
            specs.append(WeightSpec(f"{p}_proj.weight", _L + f"self_attn.{p}_proj.weight",
                                    (out, h) if p != "o" else (h, h)))
            if c.attention_bias:
                specs.append(WeightSpec(f"{p}_proj.bias", _L + f"self_attn.{p}_proj.bias", (out,)))
        return specs
    if kind == "mlp":
        specs = [WeightSpec("ln.weight", _L + "post_attention_layernorm.weight", (h,))]
        for p, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            specs.append(WeightSpec(f"{p}_proj.weight", _L + f"mlp.{p}_proj.weight", shape))
            if c.mlp_bias:
                specs.append(WeightSpec(f"{p}_proj.bias", _L + f"mlp.{p}_proj.bias", (shape[0],)))
        return specs
    if kind == "head":
        lm = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return [WeightSpec("ln.weight", "model.norm.weight", (h,)),
                WeightSpec("lm_head", lm, (c.vocab_size, h))]
    raise ValueError(kind)


def embed(w, ids: torch.Tensor, positions, c: ModelConfig) -> torch.Tensor:
    return ops.embedding(w["embed_tokens"], ids)                 # (b, s, h)


def attn_qkv(w, x: torch.Tensor, positions: torch.Tensor, c: ModelConfig):
    b, s, _ = x.shape
    x = ops.rms_norm(x, w["ln.weight"], c.norm_eps)
    q = ops.linear(x, w["q_proj.weight"], w.get("q_proj.bias"))
    k = ops.linear(x, w["k_proj.weight"], w.get("k_proj.bias"))
    v = ops.linear(x, w["v_proj.weight"], w.get("v_proj.bias"))
    split = lambda t: t.view(b, s, -1, c.head_dim).transpose(1, 2)   # (b, heads, s, d)
    q, k, v = split(q), split(k), split(v)
    cos, sin = ops.rotary_tables(positions, c.head_dim, c.rope_theta, dict(c.rope_scaling), x.dtype)
    return ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin), v


def attn_out(w, x: torch.Tensor, o: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    b, _, s, _ = o.shape
    o = o.transpose(1, 2).reshape(b, s, c.hidden_size)          # (b, s, h)
    return x + ops.linear(o, w["o_proj.weight"], w.get("o_proj.bias"))


def mlp(w, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    return ops.by_rows(x, lambda x: _mlp(w, x, c))


def _mlp(w, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    y = ops.rms_norm(x, w["ln.weight"], c.norm_eps)
    gate = ops.linear(y, w["gate_proj.weight"], w.get("gate_proj.bias"))
    up = ops.linear(y, w["up_proj.weight"], w.get("up_proj.bias"))
    return x + ops.linear(F.silu(gate) * up, w["down_proj.weight"], w.get("down_proj.bias"))


def head(w, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    return ops.linear(ops.rms_norm(x, w["ln.weight"], c.norm_eps), w["lm_head"])   # (b, vocab)
