"""GGUF checkpoints: convert a llama.cpp `.gguf` once into a Hugging Face-style directory.

Parsing and dequantizing a GGUF takes seconds to tens of seconds; loading a safetensors directory
takes about one. So `convert_gguf` writes the converted checkpoint beside the file
(`<file>.flexwrangle/`: config.json, model.safetensors, tokenizer files) and reuses it while the
file is unchanged. The engine then loads that directory like any other checkpoint.

Numbers: quantized tensors (Q4_1, Q5_0, Q8_0, K-quants, ...) are dequantized with `gguf.quants` and
stored as float32, because `scale * q + min` with float16 scales is generally not representable in
float16 (SmolLM2 Q4_1: about a quarter of the values would round). So the directory holds exactly
what transformers' own GGUF loader computes, and the engine can match it in float32; the engine then
stores weights in the policy's precision (float16 by default, which on Qwen2.5-Coder-1.5B changed no
greedy answer on the Beer prompts: docs/benchmarks.md, `stored_precision`). F32 / F16 / BF16 tensors
are stored exactly as they are. For Llama, llama.cpp permutes the rows of the q and k projections
(its rotary pairs adjacent dimensions, Hugging Face rotates halves); we undo that permutation here.
Qwen2 files keep Hugging Face's order.

Cache validity: a marker file records the source's sha256, size and mtime. A matching size and mtime
skip hashing; otherwise the file is hashed and, if the hash still matches, only the marker is
refreshed. The directory is written under a temporary name and renamed into place, so a crash
never leaves a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from .config import CheckpointError
from .gguf_check import check_layout, check_tensors

CONVERTER_VERSION = 1            # bump when the output format changes: old caches are rebuilt
MARKER = "flexwrangle_gguf.json"
SHARD_BYTES = 2 << 30            # above this, weights are split into model-0000i-of-0000n.safetensors

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}   # GGUF arch -> HF class

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face-style checkpoint directory for the GGUF file at `path`, converting if needed.

    `cache_dir` defaults to `<path>.flexwrangle` beside the file.
    """
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    out = Path(cache_dir).expanduser().resolve() if cache_dir else src.with_name(src.name + ".flexwrangle")
    stat = src.stat()
    marker = _read_marker(out)
    digest = None
    if marker is not None and marker.get("converter_version") == CONVERTER_VERSION and _complete(out):
        if (marker.get("size"), marker.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return out
        digest = file_sha256(src)
        if digest == marker.get("sha256"):          # touched or copied, same bytes: keep the cache
            _write_json_atomic(out / MARKER, _marker(src, digest, stat))
            return out
    digest = digest or file_sha256(src)
    _convert_into(src, out, digest, stat)
    return out


def open_gguf(path: Path):
    """A gguf.GGUFReader over the file, once its layout is checked (engine/gguf_check.py); every
    malformed header a CheckpointError naming the file."""
    from gguf import GGUFReader

    check_layout(path)
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:   # what the checks do not foresee
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                              "fetch it again") from e


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_to_hf_config(reader) -> dict:
    """A Hugging Face Llama or Qwen2 `config.json` dict from a GGUFReader's metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; FlexWrangle converts 'llama' "
                         "(Llama, Mistral, SmolLM, ...) and 'qwen2' (Qwen2, Qwen2.5) GGUF files")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError("this GGUF stores llama3-style rope frequency factors (rope_freqs.weight), "
                                  "which the converter does not translate yet")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"GGUF metadata: {heads} attention heads and {kv_heads} key/value heads; both "
                         "must be positive and the first a multiple of the second")
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if head_dim * heads != hidden or rope_dim != head_dim:
        raise ValueError(f"GGUF head_dim {head_dim} (rotary over {rope_dim}) with hidden {hidden} and {heads} "
                         "heads: only head_dim = hidden / heads with full rotary is supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor; is it a complete Llama checkpoint?")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else int(embed.shape[-1]))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "_name_or_path": _field(reader, "general.name", ""),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":     # Qwen2's q/k/v biases are implied by its model type; it has no sliding window here
        config.pop("attention_bias")
        config["use_sliding_window"] = False
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (d/2, 2) interleaved -> (2, d/2) halves.

    w (n_heads * head_dim, ...) or a bias (n_heads * head_dim,)
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, config: dict):
    """Yield (hf_name, torch tensor) for every GGUF tensor, dequantized and un-permuted."""
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if t.tensor_type in (T.F32, T.F16):
            w = np.array(t.data).reshape([int(d) for d in reversed(t.shape)])   # (out, in), exact
        elif t.tensor_type == T.BF16:
            w = dequantize(t.data, t.tensor_type)
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # llama.cpp permutes q/k rows only for Llama (its rotary pairs adjacent dimensions); Qwen2
        # files keep Hugging Face's rotate-halves order (llama.cpp's NEOX rotary)
        if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_rotary(w, config["num_key_value_heads"])
        tensor = torch.from_numpy(np.ascontiguousarray(w))
        if t.tensor_type == T.BF16:
            tensor = tensor.to(torch.bfloat16)                                 # exact: bf16 -> f32 -> bf16
        yield name, tensor


# ---- conversion ------------------------------------------------------------------------------

def _convert_into(src: Path, out: Path, digest: str, stat: os.stat_result) -> None:
    reader = open_gguf(src)
    try:
        config = gguf_to_hf_config(reader)
    except (TypeError, ValueError) as e:          # a metadata value of the wrong kind, or out of range
        raise CheckpointError(f"{src}: {e}") from e
    check_tensors(src, reader, config)            # before anything is dequantized
    has_tokenizer = _field(reader, "tokenizer.ggml.model") is not None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except PermissionError as e:
        raise PermissionError(f"cannot write the converted checkpoint {out} ({e}); "
                              "pass cache_dir= to convert_gguf to put it elsewhere") from e
    try:
        _write_json_atomic(tmp / "config.json", config)
        _write_weights(read_tensors(reader, config), tmp)
        if has_tokenizer:
            _write_tokenizer(src, tmp)
        _write_json_atomic(tmp / MARKER, _marker(src, digest, stat))   # last: marks the dir complete
        _swap_into_place(tmp, out, digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_weights(tensors, directory: Path) -> None:
    """Save tensors as model.safetensors, or as shards plus an index above SHARD_BYTES."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(_save_shard(current, directory, len(shards), save_file))
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if not shards:
        save_file(current, directory / "model.safetensors", metadata={"format": "pt"})
        return
    shards.append(_save_shard(current, directory, len(shards), save_file))
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (directory / f"shard-{i}.safetensors").rename(directory / final)
        weight_map.update({k: final for k in names})
    _write_json_atomic(directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def _save_shard(tensors: dict, directory: Path, i: int, save_file) -> list[str]:
    save_file(tensors, directory / f"shard-{i}.safetensors", metadata={"format": "pt"})
    return list(tensors)


def _write_tokenizer(src: Path, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat template from the GGUF metadata (via transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    tokenizer.save_pretrained(str(directory))


def _swap_into_place(tmp: Path, out: Path, digest: str) -> None:
    if _holds(out, digest):                  # another process converted the same file meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if not _holds(out, digest):          # unless another process finished first with the same file
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(out: Path) -> None:
    """Remove leftovers of conversions whose process has died."""
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        m = re.search(r"\.(?:tmp|old)-(\d+)-[0-9a-f]+$", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- small helpers -----------------------------------------------------------------------------

def _marker(src: Path, digest: str, stat: os.stat_result) -> dict:
    return {"converter_version": CONVERTER_VERSION, "source": src.name, "sha256": digest,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _holds(out: Path, digest: str) -> bool:
    """Whether `out` is a complete conversion, by this converter version, of a file with this sha256."""
    marker = _read_marker(out) or {}
    return (marker.get("sha256") == digest and marker.get("converter_version") == CONVERTER_VERSION
            and _complete(out))


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and ((out / "model.safetensors").is_file()
                                                or (out / "model.safetensors.index.json").is_file())


def _read_marker(out: Path) -> dict | None:
    try:
        with open(out / MARKER) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _f32(x) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise NotImplementedError(f"GGUF rope scaling {kind!r} is not supported (only linear)")
