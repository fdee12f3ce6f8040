"""Model shapes: a frozen `ModelConfig`, the published OPT sizes by name, and byte-size helpers.

A config is built either from a name in `OPT_SIZES` (for dummy-weight benchmarks) or from a
Hugging Face `config.json` (for real checkpoints). Nothing here touches weights.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("opt", "llama", "qwen2")


class CheckpointError(ValueError):
    """A checkpoint (config.json, weight files, a GGUF file) is missing, incomplete or corrupt."""


# Published OPT shapes (Zhang et al. 2022): hidden, layers, heads, ffn.
OPT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
    "opt-175b": (12288, 96, 96, 49152),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the math needs to know about one decoder-only model."""

    family: str                      # "opt", "llama" or "qwen2": selects engine/models/<family>.py
    name: str                        # a label for logs and benchmark tables
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int               # the context window in tokens
    num_kv_heads: int = 0            # grouped-query attention; 0 means = num_heads
    word_embed_proj_dim: int = 0     # OPT-350m: embeddings are 512 wide and projected; 0 = hidden
    do_layer_norm_before: bool = True  # OPT-350m is post-LN (False)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()         # llama3-style scaling as sorted (key, value) pairs; () = none
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1
    extra_eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; FlexWrangle runs {', '.join(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions",
                    "num_kv_heads", "word_embed_proj_dim"):
            value, least = getattr(self, key), 0 if key in ("num_kv_heads", "word_embed_proj_dim") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{self.name}: {key} is {value!r}; it must be an integer >= {least}")
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: hidden {self.hidden_size}, heads {self.num_heads}, "
                             f"kv heads {self.num_kv_heads} do not divide evenly")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- sizes -------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameter count (tied head counted once)."""
        h, f, v = self.hidden_size, self.ffn_dim, self.vocab_size
        if self.family == "opt":
            attn = 4 * h * h + 4 * h
            mlp = 2 * h * f + f + h
            norms = 4 * h
            per_layer = attn + mlp + norms
            embed = v * self.word_embed_proj_dim + (self.max_positions + 2) * h
            if self.word_embed_proj_dim != h:
                embed += 2 * h * self.word_embed_proj_dim
            head = 2 * h + (0 if self.tie_word_embeddings else v * h)
        else:
            attn = 2 * h * h + 2 * h * self.kv_dim
            mlp = 3 * h * f
            per_layer = attn + mlp + 2 * h
            if self.family == "qwen2":                   # biases on q, k and v
                per_layer += h + 2 * self.kv_dim
            embed = v * h
            head = h + (0 if self.tie_word_embeddings else v * h)
        return self.num_layers * per_layer + embed + head

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
        """KV cache of `batch` sequences of `seq_len` tokens over all layers."""
        return 2 * self.num_layers * batch * seq_len * self.kv_dim * dtype_bytes

    def hidden_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        return batch * seq_len * self.hidden_size * dtype_bytes


def opt_config(name: str) -> ModelConfig:
    """The published OPT shape called `name` ("opt-1.3b", "facebook/opt-1.3b" or "1.3b")."""
    key = name.split("/")[-1].lower()
    key = key if key.startswith("opt-") else f"opt-{key}"
    if key not in OPT_SIZES:
        raise ValueError(f"unknown model name {name!r}: known OPT sizes are {', '.join(OPT_SIZES)}; "
                         "or pass a local checkpoint directory")
    hidden, layers, heads, ffn = OPT_SIZES[key]
    return ModelConfig(
        family="opt", name=key, vocab_size=50272, hidden_size=hidden, num_layers=layers,
        num_heads=heads, ffn_dim=ffn, max_positions=2048,
        word_embed_proj_dim=512 if key == "opt-350m" else hidden,
        do_layer_norm_before=key != "opt-350m",
    )


def config_from_hf(hf: dict, name: str = "") -> ModelConfig:
    """Translate a Hugging Face `config.json` dict into a ModelConfig."""
    model_type = hf.get("model_type", "")
    name = name or hf.get("_name_or_path", "") or model_type
    if model_type == "opt":
        if hf.get("activation_function", "relu") != "relu":
            raise ValueError(f"{name}: OPT with activation {hf['activation_function']!r} is not supported")
        return ModelConfig(
            family="opt", name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            ffn_dim=hf["ffn_dim"], max_positions=hf["max_position_embeddings"],
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
            do_layer_norm_before=hf.get("do_layer_norm_before", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            attention_bias=hf.get("enable_bias", True), mlp_bias=hf.get("enable_bias", True),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"), extra_eos_token_ids=_rest(hf.get("eos_token_id")),
        )
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise NotImplementedError(f"{name}: Qwen2 with sliding-window attention is not supported "
                                  "(set use_sliding_window to false in config.json if the prompts fit the window)")
    if model_type in ("llama", "mistral", "qwen2", "smollm", "smollm2"):
        scaling = hf.get("rope_scaling") or None
        rope = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        return ModelConfig(
            family="qwen2" if model_type == "qwen2" else "llama", name=name,
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, v) for k, v in (scaling or {}).items()
                                      if k != "rope_theta" and not isinstance(v, (list, dict)))),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # Qwen2's q/k/v biases are part of its family (engine/models/qwen2.py), not this flag
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"), extra_eos_token_ids=_rest(hf.get("eos_token_id")),
        )
    raise ValueError(f"{name}: model_type {model_type!r} is not supported; FlexWrangle runs OPT, "
                     "Llama-family and Qwen2 checkpoints")


def read_hf_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory; CheckpointError naming its config.json when that is
    not JSON, lacks a key the family needs, or holds sizes no model has."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; pass a Hugging Face checkpoint directory "
                                "(config.json + *.safetensors or pytorch_model*.bin)")
    try:
        with open(path, "rb") as f:
            hf = json.load(f)
    except ValueError as e:                       # JSON and UTF-8 errors alike
        raise CheckpointError(f"{path}: not a JSON file ({e}); it is corrupt: save the model again") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(hf).__name__}, not an object of settings")
    try:
        return config_from_hf(hf, name=Path(directory).name)
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks {e.args[0]!r}, which a {hf.get('model_type')!r} model needs") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _first(x):
    return x[0] if isinstance(x, list) else x


def _rest(x) -> tuple[int, ...]:
    return tuple(x[1:]) if isinstance(x, list) else ()
