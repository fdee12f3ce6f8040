"""GGUF conversion on tiny GGUF files written here from random Llama and Qwen2 models, plus model-name
resolution.

The writer below lays tensors out the way llama.cpp's converter does (Llama's q/k rows permuted for
its rotary convention; Qwen2's left as they are), so a round trip through `convert_gguf` must give back the original weights,
and the converted directory must agree with transformers' own GGUF loader.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM)

from engine import gguf as eg  # noqa: E402
from engine.registry import resolve_model  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


# ---- a tiny GGUF writer in llama.cpp's layout ------------------------------------------------------

def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TOKENS = _byte_tokens() + ["Ġt", "he", "Ġthe"] + SPECIALS


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                         bos_token_id=TOKENS.index("<|im_start|>"), eos_token_id=TOKENS.index("<|im_end|>"),
                         pad_token_id=TOKENS.index("<|im_end|>"))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():                        # non-trivial norms so a misplaced norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_qwen2(tie: bool, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tie, use_sliding_window=False,
                         bos_token_id=TOKENS.index("<|endoftext|>"), eos_token_id=TOKENS.index("<|im_end|>"),
                         pad_token_id=TOKENS.index("<|endoftext|>"))
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():                        # transformers zeroes biases: make them count
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    return model


def write_gguf(model, path, qtype=QT.F32, tokenizer: bool = True, extra_tensors=()):
    """Write `model` as llama.cpp would: GGUF names, Llama's q/k permuted, 2-D weights in `qtype`."""
    c = model.config
    arch = c.model_type                          # "llama" or "qwen2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
        w.add_pad_token_id(c.pad_token_id)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            a = _permute(a, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            a = _permute(a, c.num_key_value_heads)
        name = gguf_name(hf_name)
        if a.ndim == 2 and qtype != QT.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    for name, a in extra_tensors:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_name(hf_name: str) -> str:
    inverse = {v: k for k, v in eg._GLOBAL_NAMES.items()}
    if hf_name in inverse:
        return inverse[hf_name]
    parts = hf_name.split(".")                   # model.layers.{i}.<module...>.weight
    module = ".".join(parts[3:-1])
    short = {v: k for k, v in eg._LAYER_NAMES.items()}[module]
    return f"blk.{parts[2]}.{short}.{parts[-1]}"


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


IDS = [[5, 77, 200, 31, 9, 120, 64, 3]]


# ---- conversion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_gives_back_the_weights_and_config(tmp_path, tie):
    model = tiny_llama(tie)
    path = write_gguf(model, tmp_path / "tiny.gguf")

    out = eg.convert_gguf(path)

    assert out == tmp_path / "tiny.gguf.flexwrangle"
    weights = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    c = model.config
    assert config["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(c, key), key
    assert config["tie_word_embeddings"] is tie
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0


@pytest.mark.parametrize("tie", [True, False])
def test_converted_dir_reproduces_the_model_and_transformers_gguf_loader(tmp_path, tie):
    model = tiny_llama(tie, seed=1)
    path = write_gguf(model, tmp_path / "tiny.gguf")

    converted = LlamaForCausalLM.from_pretrained(eg.convert_gguf(path)).eval()
    via_hf = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()

    expected = logits_of(model, IDS)
    torch.testing.assert_close(logits_of(converted, IDS), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_of(via_hf, IDS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0])
def test_qwen2_gguf_converts_to_the_qwen2_family_and_matches_transformers(tmp_path, qtype):
    from engine import LLM

    model = tiny_qwen2(tie=False, seed=6)
    path = write_gguf(model, tmp_path / "tiny-qwen2.gguf", qtype=qtype)

    out = eg.convert_gguf(path)
    via_hf = Qwen2ForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny-qwen2.gguf").eval()
    llm = LLM.from_pretrained(out, dtype="float32", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["rope_theta"] == 1e6
    assert llm.config.family == "qwen2" and llm.config.num_kv_heads == 2
    expected = logits_of(via_hf, IDS)
    if qtype == QT.F32:                                          # exact weights: the original model's logits
        torch.testing.assert_close(expected, logits_of(model, IDS), rtol=0, atol=1e-5)
    torch.testing.assert_close(llm.logits(IDS), expected[:, -1], rtol=0, atol=1e-4)


def test_q8_0_tensors_are_dequantized_like_transformers_does(tmp_path):
    model = tiny_llama(tie=False, seed=2)
    path = write_gguf(model, tmp_path / "tiny.gguf", qtype=QT.Q8_0)

    weights = load_file(eg.convert_gguf(path) / "model.safetensors")
    via_hf = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").state_dict()

    q = weights["model.layers.0.self_attn.q_proj.weight"]
    original = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32
    assert not torch.equal(q, original)                          # really quantized ...
    assert (q - original).abs().max() < 0.01 * original.abs().max()   # ... and un-permuted
    for name, tensor in weights.items():
        assert torch.equal(tensor, via_hf[name]), name


def test_tokenizer_and_chat_template_come_from_the_metadata(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf")

    tok = AutoTokenizer.from_pretrained(eg.convert_gguf(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")

    text = "the theme of the <|im_end|> other"
    assert tok(text).input_ids == ref(text).input_ids
    assert TOKENS.index("Ġthe") in tok(text).input_ids
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_without_tokenizer_converts_weights_only(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)

    out = eg.convert_gguf(path)

    assert (out / "model.safetensors").is_file()
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(TOKENS)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)      # 4 heads of dim 8
    assert np.array_equal(eg.unpermute_rotary(_permute(w, 4), 4), w)
    assert not np.array_equal(_permute(w, 4), w)


# ---- the cache --------------------------------------------------------------------------------

def test_cache_is_reused_refreshed_on_touch_and_rebuilt_on_change(tmp_path):
    path = write_gguf(tiny_llama(tie=True, seed=3), tmp_path / "tiny.gguf", tokenizer=False)
    out = eg.convert_gguf(path)
    weights_file = out / "model.safetensors"
    first = weights_file.stat().st_ino, weights_file.stat().st_mtime_ns

    assert eg.convert_gguf(path) == out                          # unchanged: reused as is
    assert (weights_file.stat().st_ino, weights_file.stat().st_mtime_ns) == first

    os.utime(path, ns=(1_000_000_000, 1_000_000_000))            # same bytes, new mtime: hash, keep
    eg.convert_gguf(path)
    assert (weights_file.stat().st_ino, weights_file.stat().st_mtime_ns) == first
    assert json.loads((out / eg.MARKER).read_text())["mtime_ns"] == 1_000_000_000

    other = tiny_llama(tie=True, seed=4)                         # new bytes: rebuilt
    write_gguf(other, path, tokenizer=False)
    eg.convert_gguf(path)
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"],
                       other.state_dict()["model.norm.weight"])
    marker = json.loads((out / eg.MARKER).read_text())
    assert marker["sha256"] == eg.file_sha256(path)


def test_new_converter_version_rebuilds_the_cache(tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)
    out = eg.convert_gguf(path)
    before = (out / "model.safetensors").stat().st_ino

    monkeypatch.setattr(eg, "CONVERTER_VERSION", eg.CONVERTER_VERSION + 1)
    eg.convert_gguf(path)

    assert (out / "model.safetensors").stat().st_ino != before
    assert json.loads((out / eg.MARKER).read_text())["converter_version"] == eg.CONVERTER_VERSION


def test_failed_conversion_leaves_no_partial_cache(tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eg, "_write_weights", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        eg.convert_gguf(path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    monkeypatch.undo()
    assert (eg.convert_gguf(path) / "model.safetensors").is_file()


def test_cache_dir_can_be_elsewhere(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)

    out = eg.convert_gguf(path, cache_dir=tmp_path / "cache" / "tiny")

    assert out == tmp_path / "cache" / "tiny" and (out / "config.json").is_file()
    assert not (tmp_path / "tiny.gguf.flexwrangle").exists()


def test_llama3_rope_factors_are_refused_clearly(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False,
                      extra_tensors=[("rope_freqs.weight", np.ones(8, dtype=np.float32))])

    with pytest.raises(NotImplementedError, match="rope_freqs"):
        eg.convert_gguf(path)


# ---- model names -------------------------------------------------------------------------------

def test_resolve_gguf_path_directory_and_opt_names(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)

    assert resolve_model(path) == tmp_path / "tiny.gguf.flexwrangle"
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model("opt-125m") == "opt-125m"
    assert resolve_model("facebook/opt-1.3b") == "facebook/opt-1.3b"


def test_resolve_unknown_names_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXWRANGLE_MODELS_DIR", str(tmp_path))

    with pytest.raises(FileNotFoundError, match="make model"):
        resolve_model("smollm2-135m")
    with pytest.raises(ValueError, match="smollm2-135m.*opt-125m"):
        resolve_model("gpt2")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(tmp_path / "missing.gguf")


def test_resolve_embedded_name_uses_the_models_dir(tmp_path, monkeypatch):
    write_gguf(tiny_llama(tie=True), tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", tokenizer=False)
    monkeypatch.setenv("FLEXWRANGLE_MODELS_DIR", str(tmp_path))

    expected = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf.flexwrangle"
    assert resolve_model("SmolLM2-135M-Instruct") == expected
    assert resolve_model("smollm2-135m") == expected


# ---- the engine on a GGUF file ------------------------------------------------------------------

def test_engine_loads_a_gguf_path_and_matches_transformers(tmp_path):
    try:
        from engine import LLM
    except ImportError as e:
        pytest.skip(f"engine.LLM is not available yet ({e})")
    model = tiny_llama(tie=False, seed=5)
    path = write_gguf(model, tmp_path / "tiny.gguf", qtype=QT.Q8_0)
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()

    llm = LLM.from_pretrained(path, dtype="float32", progress=False)
    got = llm.generate(IDS, max_new_tokens=6, do_sample=False, ignore_eos=True)

    seq = list(IDS[0])
    for _ in range(6):                                       # plain greedy, no stopping rules
        seq.append(int(logits_of(reference, [seq])[0, -1].argmax()))
    assert got == [seq[len(IDS[0]):]]
    assert llm.tokenizer is not None and llm.tokenizer.eos_token == "<|im_end|>"


def test_zero_or_uneven_head_counts_are_refused_clearly():
    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    for heads, kv in ((0, 0), (4, 3)):
        meta = {"general.architecture": "qwen2", "qwen2.embedding_length": 64,
                "qwen2.attention.head_count": heads, "qwen2.attention.head_count_kv": kv}
        reader = type("Reader", (), {"fields": {k: Field(v) for k, v in meta.items()}, "tensors": []})()
        with pytest.raises(ValueError, match="key/value heads"):
            eg.gguf_to_hf_config(reader)


def test_qwen2_with_sliding_window_is_refused_with_the_way_out():
    from engine.config import config_from_hf

    hf = tiny_qwen2(tie=True).config.to_dict()
    assert config_from_hf(hf).family == "qwen2"
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        config_from_hf({**hf, "use_sliding_window": True})


# ---- malformed files: a CheckpointError naming the file, before anything is dequantized ----------

def _patch(path, offset: int, fmt: str, value) -> None:
    import struct
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<" + fmt, value))


def _after(path, name: str) -> int:
    """The offset just past a GGUF string (a metadata key or a tensor name) in the file."""
    import struct
    data = path.read_bytes()
    at = data.index(struct.pack("<Q", len(name)) + name.encode())
    return at + 8 + len(name)


def test_a_head_count_of_zero_in_the_file_is_a_checkpoint_error(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)
    _patch(path, _after(path, "llama.attention.head_count") + 4, "I", 0)      # past the value type

    with pytest.raises(eg.CheckpointError, match=f"{path}: GGUF metadata: 0 attention heads"):
        eg.convert_gguf(path)
    assert not (tmp_path / "tiny.gguf.flexwrangle").exists()


def test_a_tensor_claiming_more_than_the_file_holds_is_never_read(tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)
    _patch(path, _after(path, "blk.0.ffn_up.weight") + 4 + 8, "Q", 1 << 40)   # (64, 2^40): 256 TiB of float32

    def never(*args, **kwargs):
        raise AssertionError("the reader must not see this file")
    monkeypatch.setattr(gguf, "GGUFReader", never)
    with pytest.raises(eg.CheckpointError, match=rf"{path}: tensor 'blk.0.ffn_up.weight' \(F32, dimensions "
                                                 r"\[64, 1099511627776\]\) .* past the end of the file"):
        eg.convert_gguf(path)


def test_metadata_claiming_more_layers_than_the_file_has_is_refused_before_converting(tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)
    _patch(path, _after(path, "llama.block_count") + 4, "I", 1_000_000_000)

    def never(*args, **kwargs):
        raise AssertionError("nothing may be dequantized")
    monkeypatch.setattr(eg, "read_tensors", never)
    with pytest.raises(eg.CheckpointError, match=f"{path}: tensor for model.layers.2.* is missing; the metadata "
                                                 "describes 1000000000 layers"):
        eg.convert_gguf(path)


def test_a_truncated_file_names_the_tensor_past_its_end(tmp_path):
    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf", tokenizer=False)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(eg.CheckpointError, match=f"{path}: tensor .* past the end of the file"):
        eg.convert_gguf(path)
