"""Bad input gets a clear exception that names the problem and the fix; nothing hangs."""
import os

import pytest
from enginekit import MIXED_PROMPTS

from engine import LLM, CheckpointError, Policy


@pytest.fixture(scope="module")
def llm(tiny_opt):
    return LLM.from_pretrained(tiny_opt[0], progress=False)


def test_unknown_model_name():
    with pytest.raises((FileNotFoundError, ValueError), match="not a checkpoint directory|known model"):
        LLM.from_pretrained("gpt-17-giant", progress=False)


def test_published_opt_name_without_checkpoint_points_to_dummy():
    with pytest.raises(FileNotFoundError, match="dummy=True"):
        LLM.from_pretrained("opt-1.3b", progress=False)


def test_unknown_opt_size_with_dummy():
    with pytest.raises(ValueError, match="opt-125m, opt-350m"):
        LLM.from_pretrained("opt-3b", dummy=True, progress=False)


def test_directory_without_weights(tmp_path, tiny_opt):
    (tmp_path / "config.json").write_text((tiny_opt[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        LLM.from_pretrained(tmp_path, progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM.from_pretrained(tmp_path, progress=False)


def test_corrupt_weight_file(tmp_path, tiny_opt):
    (tmp_path / "config.json").write_text((tiny_opt[0] / "config.json").read_text())
    good = (tiny_opt[0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        LLM.from_pretrained(tmp_path, progress=False)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate([[1, 2], []])


def test_prompt_longer_than_the_context(llm):
    with pytest.raises(ValueError, match="context window of 128"):
        llm.generate([[1] * 120], max_new_tokens=10)


def test_negative_max_new_tokens(llm):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        llm.generate(MIXED_PROMPTS, max_new_tokens=-1)


@pytest.mark.parametrize("bad", [1.5, "7", None, True])
def test_non_integer_token_id(llm, bad):
    with pytest.raises(TypeError, match="token ids must be ints"):
        llm.generate([[1, bad, 3]])


def test_token_id_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 100]])


def test_flat_list_instead_of_a_batch(llm):
    with pytest.raises(TypeError, match="list of token-id lists"):
        llm.generate([1, 2, 3])


def test_bad_stop(llm):
    with pytest.raises(TypeError, match="stop must be"):
        llm.generate(MIXED_PROMPTS, stop=[1.5])


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_gpu_percent=80, w_cpu_percent=40), "add up to at most 100"),
    (dict(gpu_batch_size=0), "at least 1"),
    (dict(act_gpu_percent=50, act_cpu_percent=50), "one tier"),
])
def test_invalid_policy(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(**kwargs)


def test_policy_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown Policy fields"):
        Policy.from_dict({"gpu_batch": 4})
    assert Policy.from_dict(Policy(gpu_batch_size=3).to_dict()) == Policy(gpu_batch_size=3)


@pytest.mark.parametrize("knob", ["pin_weight", "attn_sparsity"])
def test_policy_has_no_knobs_that_do_nothing(knob):
    with pytest.raises(TypeError, match=knob):
        Policy(**{knob: 1})
    with pytest.raises(ValueError, match=knob):
        Policy.from_dict({knob: 1})


def test_safetensors_are_read_with_pread_exactly_as_the_library_reads_them(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from engine.weights import SafetensorsFile
    tensors = {"f16": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "f32": torch.randn(2, 2, 2),
               "i64": torch.arange(6).view(2, 3), "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False]),
               "empty": torch.empty(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, theirs = SafetensorsFile(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert sorted(ours.keys()) == sorted(theirs)
    for name, t in theirs.items():
        got = ours.get_tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_a_safetensors_header_past_the_end_is_corrupt(tmp_path, tiny_opt):
    (tmp_path / "config.json").write_text((tiny_opt[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupt"):
        LLM.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("offsets", [[0, 0], [0, 8]])
def test_a_safetensors_entry_whose_bytes_do_not_match_its_shape_is_corrupt(tmp_path, tiny_opt, offsets):
    """Empty data offsets for a (4, 4) float32 tensor would have become uninitialised weights."""
    import json
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": offsets}}).encode()
    (tmp_path / "config.json").write_text((tiny_opt[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(CheckpointError, match="needs 64 bytes"):
        LLM.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 0}, "num_heads is 0; it must be an integer >= 1"),
    ({"hidden_size": -32}, "hidden_size is -32"),
    ({"ffn_dim": 64.5}, "ffn_dim is 64.5"),
    ({"vocab_size": None}, "vocab_size is None"),
])
def test_a_config_with_sizes_no_model_has_is_a_checkpoint_error_naming_it(tmp_path, tiny_opt, change, match):
    import json
    config = {**json.loads((tiny_opt[0] / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny_opt[0] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'}: .*{match}"):
        LLM.from_pretrained(tmp_path, progress=False)


def test_a_config_claiming_more_than_the_weights_hold_allocates_nothing_not_even_on_disk(tmp_path, tiny_opt):
    """The claim (a 2^31-token vocabulary: a 128 GiB embedding) is held against the files' headers first;
    without that, the disk tier would reserve room for it before reading a byte."""
    import json
    ckpt, offload = tmp_path / "ckpt", tmp_path / "offload"
    ckpt.mkdir()
    offload.mkdir()
    config = {**json.loads((tiny_opt[0] / "config.json").read_text()), "vocab_size": 1 << 31}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes((tiny_opt[0] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'model.safetensors'}: tensor 'model.decoder.embed_tokens."
                                              r"weight' has shape \(100, 32\), config.json implies \(2147483648, 32\)"):
        LLM.from_pretrained(ckpt, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=offload,
                            disk_mem="1024TB", progress=False)
    assert os.listdir(offload) == []


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [-4, 4], "data_offsets": [0, 64]}, r"shape \[-4, 4\] is not a list of sizes >= 0"),
    ({"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]}, "dtype 'F8_E4M3' is not one this engine reads"),
    ({"dtype": "F32", "shape": [4, 4]}, "lacks dtype, shape or data_offsets"),
    ({"dtype": "F32", "shape": [1 << 40, 4], "data_offsets": [0, 1 << 44]}, "lies past the end of the file"),
])
def test_a_malformed_safetensors_entry_is_a_checkpoint_error_naming_the_file(tmp_path, tiny_opt, entry, match):
    import json
    header = json.dumps({"w": entry}).encode()
    (tmp_path / "config.json").write_text((tiny_opt[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'model.safetensors'}: .*{match}"):
        LLM.from_pretrained(tmp_path, progress=False)
