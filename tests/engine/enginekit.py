"""Helpers shared by the engine tests: tiny random checkpoints, a character tokenizer, references.

Test modules import from here (not from conftest, whose module name every test folder shares)."""

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


def _save_qwen2(path, **overrides):
    """A tiny Qwen2: q/k/v biases (random, so that a missing bias shows), rope theta 1e6, GQA 4:2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=1e6, use_sliding_window=False)
    kw.update(overrides)
    model = Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    with torch.no_grad():                     # transformers initialises biases to zero
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    char_tokenizer(kw["vocab_size"]).save_pretrained(path)
    return model


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


POLICIES = {
    "all on the compute device": dict(),
    "weights 50/50 cpu/disk": dict(w_gpu_percent=0, w_cpu_percent=50),
    "weights all on disk, cache on cpu": dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
                                              cache_cpu_percent=100),
    "cache across three tiers": dict(cache_gpu_percent=34, cache_cpu_percent=33),
    "everything split, overlap off": dict(w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=34,
                                          cache_cpu_percent=33, overlap=False),
    "cpu cache compute": dict(cache_gpu_percent=0, cache_cpu_percent=60, cpu_cache_compute=True),
    "activations on cpu, one layer per decoder": dict(act_gpu_percent=0, act_cpu_percent=100, sep_layer=False,
                                                      w_gpu_percent=50, w_cpu_percent=0),
    "activations on disk": dict(act_gpu_percent=0, act_cpu_percent=0, cache_gpu_percent=50, cache_cpu_percent=0),
}
