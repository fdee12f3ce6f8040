"""Tiny random OPT and Llama checkpoints (and a character-level tokenizer) for equivalence tests."""
import pytest
import torch


def char_tokenizer(vocab_size: int):
    """A character-level fast tokenizer over printable ASCII; ids 0..2 are <pad>, <s>, </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in chars[: vocab_size - 3]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _save_opt(path, **overrides):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
              max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(overrides)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    model.save_pretrained(path)
    char_tokenizer(kw["vocab_size"]).save_pretrained(path)
    return model


def _save_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(path)
    char_tokenizer(kw["vocab_size"]).save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt-tiny")
    return path, _save_opt(path)


@pytest.fixture(scope="session")
def tiny_opt_350m_like(tmp_path_factory):
    """word_embed_proj_dim != hidden (project_in / project_out) and post-LN, like OPT-350m."""
    path = tmp_path_factory.mktemp("opt-350m-like")
    return path, _save_opt(path, word_embed_proj_dim=16, do_layer_norm_before=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tiny")
    return path, _save_llama(path, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tiny-tied")
    return path, _save_llama(path, tie_word_embeddings=True, num_key_value_heads=1)


MIXED_PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16, 17, 18], [1, 3],
                 [1, 40, 41, 42], [1, 50, 51, 52, 53, 54]]


def left_pad(prompts, pad=0):
    s = max(map(len, prompts))
    ids = torch.tensor([[pad] * (s - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(model, prompts, n):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(2) + 1] if 2 in r else r for r in rows]   # new tokens up to and with </s>


def hf_last_logits(model, prompts):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
