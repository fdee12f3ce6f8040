"""OPT (Zhang et al. 2022): learned positions, LayerNorm, ReLU MLP; OPT-350m's projections and post-LN."""
from __future__ import annotations

import torch

from .. import ops
from ..config import ModelConfig
from . import WeightSpec

ATTN_SCALE = 1.0   # q is scaled by head_dim ** -0.5 inside attn_qkv, as transformers does

_P = "model.decoder."
_L = _P + "layers.{i}."


def layer_weights(c: ModelConfig, kind: str) -> list[WeightSpec]:
    h, e = c.hidden_size, c.word_embed_proj_dim
    if kind == "embed":
        specs = [WeightSpec("embed_tokens", _P + "embed_tokens.weight", (c.vocab_size, e)),
                 WeightSpec("embed_positions", _P + "embed_positions.weight", (c.max_positions + 2, h))]
        if e != h:
            specs.append(WeightSpec("project_in", _P + "project_in.weight", (h, e)))
        return specs
    if kind == "attn":
        specs = [WeightSpec(f"{p}_proj.{t}", _L + f"self_attn.{p}_proj.{t}", (h, h) if t == "weight" else (h,))
                 for p in ("q", "k", "v", "out") for t in ("weight", "bias")]
        return specs + [WeightSpec(f"ln.{t}", _L + f"self_attn_layer_norm.{t}", (h,)) for t in ("weight", "bias")]
    if kind == "mlp":
        return [WeightSpec("fc1.weight", _L + "fc1.weight", (c.ffn_dim, h)),
                WeightSpec("fc1.bias", _L + "fc1.bias", (c.ffn_dim,)),
                WeightSpec("fc2.weight", _L + "fc2.weight", (h, c.ffn_dim)),
                WeightSpec("fc2.bias", _L + "fc2.bias", (h,)),
                WeightSpec("ln.weight", _L + "final_layer_norm.weight", (h,)),
                WeightSpec("ln.bias", _L + "final_layer_norm.bias", (h,))]
    if kind == "head":
        specs = []
        if c.do_layer_norm_before:
            specs += [WeightSpec("ln.weight", _P + "final_layer_norm.weight", (h,)),
                      WeightSpec("ln.bias", _P + "final_layer_norm.bias", (h,))]
        if e != h:
            specs.append(WeightSpec("project_out", _P + "project_out.weight", (e, h)))
        lm = _P + "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return specs + [WeightSpec("lm_head", lm, (c.vocab_size, e))]
    raise ValueError(kind)


def embed(w, ids: torch.Tensor, positions: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    x = ops.embedding(w["embed_tokens"], ids)                    # (b, s, e)
    if "project_in" in w:
        x = ops.linear(x, w["project_in"])                       # (b, s, h)
    return x + ops.embedding(w["embed_positions"], positions + 2)   # OPT's position offset is 2


def attn_qkv(w, x: torch.Tensor, positions, c: ModelConfig):
    b, s, _ = x.shape
    if c.do_layer_norm_before:
        x = ops.layer_norm(x, w["ln.weight"], w["ln.bias"], c.norm_eps)
    q = ops.linear(x, w["q_proj.weight"], w["q_proj.bias"]) * c.head_dim ** -0.5
    k = ops.linear(x, w["k_proj.weight"], w["k_proj.bias"])
    v = ops.linear(x, w["v_proj.weight"], w["v_proj.bias"])
    split = lambda t: t.view(b, s, -1, c.head_dim).transpose(1, 2)   # (b, heads, s, d)
    return split(q), split(k), split(v)


def attn_out(w, x: torch.Tensor, o: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    b, _, s, _ = o.shape
    o = o.transpose(1, 2).reshape(b, s, c.hidden_size)          # (b, s, h)
    x = x + ops.linear(o, w["out_proj.weight"], w["out_proj.bias"])
    if not c.do_layer_norm_before:
        x = ops.layer_norm(x, w["ln.weight"], w["ln.bias"], c.norm_eps)
    return x


def mlp(w, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    y = ops.layer_norm(x, w["ln.weight"], w["ln.bias"], c.norm_eps) if c.do_layer_norm_before else x
    y = torch.relu(ops.linear(y, w["fc1.weight"], w["fc1.bias"]))
    x = x + ops.linear(y, w["fc2.weight"], w["fc2.bias"])
    if not c.do_layer_norm_before:
        x = ops.layer_norm(x, w["ln.weight"], w["ln.bias"], c.norm_eps)
    return x


def head(w, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    if "ln.weight" in w:
        x = ops.layer_norm(x, w["ln.weight"], w["ln.bias"], c.norm_eps)
    if "project_out" in w:
        x = ops.linear(x, w["project_out"])
    return ops.linear(x, w["lm_head"])                          # (b, vocab)
