"""The embedded SmolLM2-135M-Instruct (Q4_1 GGUF): conversion and engine against transformers.

transformers' own GGUF loader is the reference: the converted directory must give the same logits,
and the engine the same greedy tokens. Skipped when the model file is missing (`make model`).
"""
from __future__ import annotations

import pytest
import torch

from engine.gguf import convert_gguf
from engine.registry import EMBEDDED, models_dir

MODEL_FILE = models_dir() / EMBEDDED["smollm2-135m"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL_FILE.is_file(), reason=f"{MODEL_FILE} missing; run `make model`"),
]

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Record A: name 'Apple iPhone 12 64GB black', price 699. Record B: name 'iPhone 12 (64 GB) - Black', "
    "price 689.99. Do A and B refer to the same product? Answer yes or no.",
    "List three fruits that are red, and say in one sentence why each of them is red.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def converted():
    return convert_gguf(MODEL_FILE)


@pytest.fixture(scope="module")
def reference():
    """(model, tokenizer) loaded by transformers straight from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=MODEL_FILE.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_FILE.parent), dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(str(MODEL_FILE.parent), **kwargs)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_converted_dir_matches_transformers_gguf_load(converted, reference):
    from transformers import AutoTokenizer, LlamaForCausalLM

    ref_model, ref_tok = reference
    model = LlamaForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(converted))

    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    for prompt in PROMPTS[:3]:
        ids = chat_ids(ref_tok, prompt)
        assert chat_ids(tok, prompt) == ids
        with torch.no_grad():
            got = model(torch.tensor([ids])).logits
            want = ref_model(torch.tensor([ids])).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _engine_llm_class():
    try:
        from engine import LLM
    except ImportError as e:
        pytest.skip(f"engine.LLM is not available yet ({e})")
    return LLM


def _transformers_greedy(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first end-of-sequence token."""
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


def test_engine_greedy_equals_transformers_on_chat_batch(reference):
    LLM = _engine_llm_class()
    ref_model, ref_tok = reference
    prompts = [chat_ids(ref_tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)           # four different lengths

    llm = LLM.from_pretrained("smollm2-135m", dtype="float32", progress=False)
    got = llm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    want = _transformers_greedy(ref_model, ref_tok, prompts)

    assert [llm.encode(p, chat=True) for p in PROMPTS] == prompts
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: engine {ref_tok.decode(g)!r} != transformers {ref_tok.decode(w)!r}"


def test_engine_answers_in_text():
    LLM = _engine_llm_class()
    llm = LLM.from_pretrained("smollm2-135m", dtype="float32", progress=False)

    [answer] = llm.generate_text(["What is the capital of France?"], max_new_tokens=12, chat=True)

    assert "Paris" in answer
