"""The embedded GGUF models (SmolLM2-135M Q4_1, Qwen2.5-Coder-1.5B Q4_K_M): engine against transformers.

transformers' own GGUF loader is the reference: the converted directory must give the same logits,
and the engine the same last-position logits (1e-4, float32) and greedy tokens on chat prompts.
Skipped when a model file is missing (`make model` fetches both).
"""
from __future__ import annotations

import gc

import pytest
import torch

from engine.gguf import convert_gguf
from engine.registry import MODELS as EMBEDDED_MODELS, models_dir

MODELS = ["smollm2-135m", "qwen2.5-coder-1.5b"]
pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Record A: name 'Apple iPhone 12 64GB black', price 699. Record B: name 'iPhone 12 (64 GB) - Black', "
    "price 689.99. Do A and B refer to the same product? Answer yes or no.",
    "List three fruits that are red, and say in one sentence why each of them is red.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    """(name, GGUF path, model, tokenizer): transformers' float32 load straight from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models_dir() / EMBEDDED_MODELS[request.param].file
    if not path.is_file():
        pytest.skip(f"{path} missing; run `make model`")
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval()
    yield request.param, path, model, AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    del model
    gc.collect()


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_converted_dir_matches_transformers_gguf_load(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, ref_model, ref_tok = reference
    converted = convert_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(converted))

    for key in ("model_type", "tie_word_embeddings", "num_key_value_heads", "rope_parameters", "vocab_size"):
        assert getattr(model.config, key) == getattr(ref_model.config, key), key
    for prompt in PROMPTS[:2]:
        ids = chat_ids(ref_tok, prompt)
        assert chat_ids(tok, prompt) == ids
        with torch.no_grad():
            got = model(torch.tensor([ids])).logits
            want = ref_model(torch.tensor([ids])).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    del model
    gc.collect()


def _transformers_greedy(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first end-of-sequence token.

    The mask is passed explicitly: chat prompts contain the pad token id, from which `generate`
    would otherwise infer a padding mask that hides them."""
    pad, eos = tokenizer.pad_token_id, model.config.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)
    results = []
    for row in out[:, width:].tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


@pytest.fixture(scope="module")
def engine_llm(reference):
    from engine import LLM

    llm = LLM.from_pretrained(reference[0], dtype="float32", progress=False)
    yield llm
    llm.close()
    del llm
    gc.collect()


def test_engine_logits_equal_transformers(reference, engine_llm):
    _, _, ref_model, ref_tok = reference
    for prompt in PROMPTS[:3]:
        ids = chat_ids(ref_tok, prompt)
        with torch.no_grad():
            want = ref_model(torch.tensor([ids])).logits[:, -1]
        torch.testing.assert_close(engine_llm.logits([ids]), want, rtol=0, atol=1e-4)


def test_engine_greedy_equals_transformers_on_chat_batch(reference, engine_llm):
    _, _, ref_model, ref_tok = reference
    prompts = [chat_ids(ref_tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)           # four different lengths

    got = engine_llm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    want = _transformers_greedy(ref_model, ref_tok, prompts)

    assert [engine_llm.encode(p, chat=True) for p in PROMPTS] == prompts
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: engine {ref_tok.decode(g)!r} != transformers {ref_tok.decode(w)!r}"


def test_engine_answers_in_text(engine_llm):
    [answer] = engine_llm.generate_text(["What is the capital of France?"], max_new_tokens=12, chat=True)

    assert "Paris" in answer
