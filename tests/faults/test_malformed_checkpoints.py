"""Malformed checkpoints, one row each: a GGUF file, a safetensors file or a config.json that is wrong in one
way. Each must raise CheckpointError whose message names the file and the problem, and loading it must
allocate no more than the file's own size, whatever sizes it claims.

Files are made here byte by byte, from a tiny valid model (one Llama layer, hidden size 8, float32), which
is first shown to load. Allocation is measured with tracemalloc, which sees Python's and numpy's memory:
the checks and readers run there, before any torch tensor exists.
"""
from __future__ import annotations

import json
import re
import struct
import tracemalloc

import gguf  # noqa: F401  (imported before measuring: importing allocates)
import numpy as np
import pytest
import tqdm.auto  # noqa: F401
from safetensors.numpy import save_file

from engine import LLM, CheckpointError

# fixed costs: the 1 MiB block the GGUF file is hashed in, the readers' objects per field and tensor; the
# claims below are of GiBs to TiBs
SLACK = 2 << 20

# ---- a tiny Llama, hidden 8, 2 heads of 4, 1 key/value head, ffn 16, vocab 16, 1 layer -----------------

H, FFN, VOCAB, KV = 8, 16, 16, 4
SHAPES = {                                       # GGUF name -> (out, in) as Hugging Face stores it
    "token_embd.weight": (VOCAB, H), "output_norm.weight": (H,),
    "blk.0.attn_norm.weight": (H,), "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (KV, H),
    "blk.0.attn_v.weight": (KV, H), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_norm.weight": (H,),
    "blk.0.ffn_gate.weight": (FFN, H), "blk.0.ffn_up.weight": (FFN, H), "blk.0.ffn_down.weight": (H, FFN),
}
U8, U32, I32, F32, STR, ARR, U64 = 0, 4, 5, 6, 8, 9, 10


def gguf_spec() -> dict:
    meta = {"general.architecture": (STR, "llama"), "llama.block_count": (U32, 1),
            "llama.context_length": (U32, 32), "llama.embedding_length": (U32, H),
            "llama.feed_forward_length": (U32, FFN), "llama.attention.head_count": (U32, 2),
            "llama.attention.head_count_kv": (U32, 1), "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
            "llama.vocab_size": (U32, VOCAB)}
    rng = np.random.default_rng(0)
    tensors = [dict(name=n, dims=list(reversed(s)), type=0, data=rng.standard_normal(s, dtype=np.float32).tobytes())
               for n, s in SHAPES.items()]
    return dict(magic=b"GGUF", version=3, meta=meta, tensors=tensors, n_kv=None, n_tensors=None, cut=0)


def _string(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        itype, items = value
        body = items if isinstance(items, bytes) else b"".join(_value(itype, v) for v in items)
        return struct.pack("<IQ", itype, len(items)) + body
    return struct.pack("<" + {U8: "B", U32: "I", I32: "i", F32: "f", U64: "Q"}[vtype], value)


def gguf_bytes(spec: dict) -> bytes:
    out = bytearray(spec["magic"] + struct.pack("<I", spec["version"]))
    out += struct.pack("<QQ", len(spec["tensors"]) if spec["n_tensors"] is None else spec["n_tensors"],
                       len(spec["meta"]) if spec["n_kv"] is None else spec["n_kv"])
    for key, (vtype, value) in spec["meta"].items():      # vtype None: `value` is the raw type and payload
        out += _string(key) + (value if vtype is None else struct.pack("<I", vtype) + _value(vtype, value))
    offset, blobs = 0, []
    for t in spec["tensors"]:
        at = t.get("offset", offset)
        out += _string(t["name"]) + struct.pack("<I", len(t["dims"])) + struct.pack(f"<{len(t['dims'])}Q", *t["dims"])
        out += struct.pack("<IQ", t["type"], at)
        blobs.append((at, t["data"]))
        offset = -(-(at + len(t["data"])) // 32) * 32
    out += bytes(-len(out) % 32)
    data = bytearray(max((at + len(d) for at, d in blobs), default=0))
    for at, d in blobs:
        data[at: at + len(d)] = d
    whole = bytes(out + data)
    return whole[: len(whole) - spec["cut"]] if spec["cut"] else whole


def tensor(spec: dict, name: str) -> dict:
    return next(t for t in spec["tensors"] if t["name"] == name)


def g(change):
    """A GGUF case: the valid spec, changed in place by `change`."""
    def make(tmp_path):
        spec = gguf_spec()
        change(spec)
        path = tmp_path / "model.gguf"
        path.write_bytes(gguf_bytes(spec))
        return path, path
    return make


def raw(data: bytes):
    """A GGUF case: these bytes."""
    def make(tmp_path):
        path = tmp_path / "model.gguf"
        path.write_bytes(data)
        return path, path
    return make


GGUF_CASES = [
    ("empty file", raw(b""), "too short for a GGUF header"),
    ("bad magic", g(lambda s: s.update(magic=b"GGUG")), "not a GGUF file .*b'GGUG'"),
    ("truncated header", raw(b"GGUF" + struct.pack("<I", 3) + bytes(12)), "too short for a GGUF header"),
    ("unknown version", g(lambda s: s.update(version=7)), "GGUF version 7"),
    ("metadata count beyond the file", g(lambda s: s.update(n_kv=1 << 60)),
     "lists 11 tensors and 1152921504606846976 metadata entries, more than the .* bytes after it can hold"),
    ("tensor count beyond the file", g(lambda s: s.update(n_tensors=1 << 60)), "1152921504606846976 tensors"),
    ("string longer than the file", g(lambda s: s["meta"].update({"general.name": (None, struct.pack("<IQ", STR,
                                                                                                   1 << 62))})),
     "metadata 'general.name' at byte .* needs 4611686018427387904 bytes, past the end of the file"),
    ("unknown value type", g(lambda s: s["meta"].update({"general.name": (None, struct.pack("<II", 99, 1))})),
     "value type 99, which GGUF does not define"),
    ("array of a billion items", g(lambda s: s["meta"].update({"x": (None, struct.pack("<IIQ", ARR, U32, 10**9))})),
     "metadata 'x''s 1000000000 items at byte .* needs 4000000000 bytes, past the end of the file"),
    ("arrays of more items than a model's", g(lambda s: s["meta"].update({"x": (ARR, (U8, bytes(3 << 20)))})),
     "brings the metadata to 3145728 array items"),
    ("no dimensions", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(dims=[])), "0 dimensions"),
    ("five dimensions", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(dims=[8, 16, 1, 1, 1])),
     "5 dimensions"),
    ("a zero dimension", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(dims=[8, 0])),
     r"dimensions \[8, 0\]; each must be at least 1"),
    ("huge dimensions", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(dims=[8, 1 << 40])),
     r"'blk.0.ffn_up.weight' \(F32, dimensions \[8, 1099511627776\]\) has its 35184372088832 bytes .* past the end"),
    ("data past the end", g(lambda s: s.update(cut=100)), "'blk.0.ffn_down.weight' .* past the end of the file"),
    ("misaligned data", g(lambda s: tensor(s, "blk.0.ffn_down.weight").update(offset=1000 * 32 + 4)),
     "not aligned to 32"),
    ("unknown tensor type", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(type=200)),
     "type 200, which GGUF does not define"),
    ("type the converter cannot dequantize", g(lambda s: tensor(s, "blk.0.ffn_up.weight").update(type=26)),
     "is I32, a type the converter cannot dequantize"),
    ("tensor listed twice", g(lambda s: s["tensors"].append(dict(tensor(s, "output_norm.weight")))),
     "'output_norm.weight' is listed twice"),
    ("zero attention heads", g(lambda s: s["meta"].update({"llama.attention.head_count": (U32, 0)})),
     "0 attention heads"),
    ("negative layer count", g(lambda s: s["meta"].update({"llama.block_count": (I32, -1)})),
     "num_layers is -1"),
    ("more layers than tensors", g(lambda s: s["meta"].update({"llama.block_count": (U32, 1 << 30)})),
     "tensor for model.layers.1.* is missing; the metadata describes 1073741824 layers"),
    ("a missing tensor", g(lambda s: s["tensors"].remove(tensor(s, "blk.0.attn_v.weight"))),
     "tensor for model.layers.0.self_attn.v_proj.weight is missing"),
    ("huge vocabulary claimed", g(lambda s: s["meta"].update({"llama.vocab_size": (U32, 1 << 31)})),
     r"'token_embd.weight' has shape \(16, 8\), the metadata implies \(2147483648, 8\)"),
    ("an extra layer's tensor", g(lambda s: s["tensors"].append(dict(tensor(s, "output_norm.weight"),
                                                                    name="blk.1.attn_norm.weight"))),
     r"1 tensors beyond what the metadata describes \(e.g. blk.1.attn_norm.weight\)"),
    ("an unknown tensor", g(lambda s: s["tensors"].append(dict(tensor(s, "output_norm.weight"), name="mystery"))),
     "unexpected GGUF tensor 'mystery'"),
    ("missing metadata", g(lambda s: s["meta"].pop("llama.embedding_length")), "lacks llama.embedding_length"),
    ("metadata of the wrong kind", g(lambda s: s["meta"].update({"llama.embedding_length": (STR, "eight")})),
     "invalid literal for int"),
    ("unsupported architecture", g(lambda s: s["meta"].update({"general.architecture": (STR, "mamba")})),
     "architecture 'mamba' is not supported"),
    ("alignment not a power of two", g(lambda s: s["meta"].update({"general.alignment": (U32, 24)})),
     "general.alignment 24 is not a power of two"),
]


# ---- the same model as a Hugging Face directory: config.json + model.safetensors -----------------------

CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FFN,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def hf_dir(tmp_path, config: dict | None = None):
    from engine.gguf import hf_tensor_name
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    save_file({hf_tensor_name(n): rng.standard_normal(s, dtype=np.float32) for n, s in SHAPES.items()},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config or CONFIG))
    return d


def st(change, cut: int = 0, named: str = "file"):
    """A safetensors case: the valid file with its header changed by `change` (in place, or returning
    the header's raw bytes), and `cut` bytes cut off its end. The error names the file, or the
    checkpoint directory (`named="dir"`) when a tensor is missing from all of it."""
    def make(tmp_path):
        d = hf_dir(tmp_path)
        f = d / "model.safetensors"
        blob = f.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header, data = json.loads(blob[8: 8 + n]), blob[8 + n:]
        new = change(header)
        head = new if isinstance(new, bytes) else json.dumps(header).encode()
        whole = len(head).to_bytes(8, "little") + head + data
        f.write_bytes(whole[: len(whole) - cut])
        return d, f if named == "file" else d
    return make


def st_raw(data: bytes):
    def make(tmp_path):
        d = hf_dir(tmp_path)
        (d / "model.safetensors").write_bytes(data)
        return d, d / "model.safetensors"
    return make


def c(change, names_weights: str | None = None):
    """A config.json case: the valid config changed by `change` (in place, or returning its raw text).
    The error names config.json, or the weights (`names_weights`: "file" or "dir") when the config is
    well formed but the weights do not hold what it claims."""
    def make(tmp_path):
        config = json.loads(json.dumps(CONFIG))
        new = change(config)
        d = hf_dir(tmp_path)
        (d / "config.json").write_text(new if isinstance(new, str) else json.dumps(config))
        named = {"file": d / "model.safetensors", "dir": d}.get(names_weights, d / "config.json")
        return d, named
    return make


Q = "model.layers.0.self_attn.q_proj.weight"
SAFETENSORS_CASES = [
    ("empty file", st_raw(b""), "header length -1 does not fit a file of 0 bytes"),
    ("header longer than the file", st_raw((10**9).to_bytes(8, "little") + b"{}"),
     "header length 1000000000 does not fit a file of 10 bytes"),
    ("header not JSON", st(lambda h: b"{not json"), "the header is not JSON"),
    ("header a list", st(lambda h: b"[]"), "the header is a JSON list, not an object"),
    ("entry without offsets", st(lambda h: h[Q].pop("data_offsets")), "lacks dtype, shape or data_offsets"),
    ("negative dimension", st(lambda h: h[Q].update(shape=[-8, -8])), r"shape \[-8, -8\] is not a list of sizes"),
    ("unknown dtype", st(lambda h: h[Q].update(dtype="F8_E4M3")), "dtype 'F8_E4M3' is not one this engine reads"),
    ("data past the end", st(lambda h: h[Q].update(data_offsets=[0, 1 << 40])), "lies past the end of the file"),
    ("huge shape claimed", st(lambda h: h[Q].update(shape=[1 << 40, 8], data_offsets=[0, 1 << 45])),
     "lies past the end of the file"),
    ("bytes that do not fit the shape", st(lambda h: h[Q].update(shape=[8, 9])),
     "needs 288 bytes, the header gives 256"),
    ("truncated file", st(lambda h: None, cut=100), "lies past the end of the file"),
    ("a missing tensor", st(lambda h: h.pop("model.layers.0.self_attn.v_proj.weight"), named="dir"),
     "tensor 'model.layers.0.self_attn.v_proj.weight' is missing"),
    ("shape other than the config's", st(lambda h: h[Q].update(shape=[4, 16])),
     rf"tensor '{Q}' has shape \(4, 16\), config.json implies \(8, 8\)"),
]

CONFIG_CASES = [
    ("not JSON", c(lambda k: "{"), "not a JSON file"),
    ("a list", c(lambda k: "[]"), "holds a JSON list, not an object of settings"),
    ("missing hidden size", c(lambda k: k.pop("hidden_size")), "lacks 'hidden_size'"),
    ("zero attention heads", c(lambda k: k.update(num_attention_heads=0)), "num_heads is 0"),
    ("negative hidden size", c(lambda k: k.update(hidden_size=-8)), "hidden_size is -8"),
    ("fractional size", c(lambda k: k.update(intermediate_size=16.5)), "ffn_dim is 16.5"),
    ("heads that do not divide", c(lambda k: k.update(num_attention_heads=3)), "do not divide evenly"),
    ("unknown model type", c(lambda k: k.update(model_type="gpt9")), "model_type 'gpt9' is not supported"),
    ("huge vocabulary claimed", c(lambda k: k.update(vocab_size=1 << 31), "file"),
     r"has shape \(16, 8\), config.json implies \(2147483648, 8\)"),
    ("more layers than the weights", c(lambda k: k.update(num_hidden_layers=1000), "dir"),
     "tensor 'model.layers.1.input_layernorm.weight' is missing"),
]

CASES = [pytest.param(make, match, kind, id=f"{kind}: {name}")
         for kind, table in (("gguf", GGUF_CASES), ("safetensors", SAFETENSORS_CASES), ("config", CONFIG_CASES))
         for name, make, match in table]
KINDS = {"gguf": "GGUF", "safetensors": "safetensors", "config": "config.json"}


@pytest.mark.parametrize("make", [g(lambda s: None), lambda t: (hf_dir(t), None)], ids=["gguf", "safetensors"])
def test_the_valid_files_load(tmp_path, make):
    target, _ = make(tmp_path)
    llm = LLM.from_pretrained(target, dtype="float32", progress=False)
    assert llm.config.num_layers == 1 and len(llm.generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True)[0]) == 2
    llm.close()


@pytest.mark.parametrize("make, match, kind", CASES)
def test_a_malformed_checkpoint_names_the_file_and_the_problem_and_allocates_no_more_than_it_holds(
        tmp_path, make, match, kind, fault_report):
    target, named = make(tmp_path)
    held = sum(p.stat().st_size for p in (target.iterdir() if target.is_dir() else [target]))

    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            LLM.from_pretrained(target, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert str(e.value).startswith(f"{named}:"), str(e.value)
    assert re.search(match, str(e.value)), str(e.value)
    assert peak <= held + SLACK, f"{peak} bytes allocated for a checkpoint of {held}"
    fault_report("malformed checkpoint files", trials=1, faults=1, rows_lost=0, duplicates=0, outcome="clear error",
                 note="no rows (a model load); each a CheckpointError naming the file and the problem, allocating "
                      "no more than the file's size + 2 MiB; files", counts={KINDS[kind]: 1})
