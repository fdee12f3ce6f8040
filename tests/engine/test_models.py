"""Each model family matches transformers at tiny sizes: logits (1e-4, float32) and greedy tokens."""
import pytest
import torch
from enginekit import MIXED_PROMPTS, hf_greedy, hf_last_logits

from engine import LLM, Policy

FAMILIES = ["tiny_opt", "tiny_opt_350m_like", "tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_qwen2_tied"]


@pytest.mark.parametrize("fixture", FAMILIES)
def test_last_position_logits_match_transformers(fixture, request):
    path, model = request.getfixturevalue(fixture)
    llm = LLM.from_pretrained(path, dtype="float32", progress=False)
    got = llm.logits(MIXED_PROMPTS)
    want = hf_last_logits(model, MIXED_PROMPTS)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("sep_layer", [True, False])
def test_greedy_tokens_match_transformers(fixture, sep_layer, request):
    path, model = request.getfixturevalue(fixture)
    llm = LLM.from_pretrained(path, dtype="float32", progress=False,
                              policy=Policy(gpu_batch_size=4, num_gpu_batches=2, sep_layer=sep_layer))
    got = llm.generate(MIXED_PROMPTS, max_new_tokens=12)
    assert got == hf_greedy(model, MIXED_PROMPTS, 12)


def test_sampling_is_reproducible_with_a_seed(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False)
    a = llm.generate(MIXED_PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, ignore_eos=True)
    b = llm.generate(MIXED_PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, ignore_eos=True)
    c = llm.generate(MIXED_PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=8, ignore_eos=True)
    greedy = llm.generate(MIXED_PROMPTS, max_new_tokens=10, ignore_eos=True)
    assert a == b
    assert a != c and a != greedy


def test_top_p_keeps_only_the_nucleus(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False)
    greedy = llm.generate(MIXED_PROMPTS, max_new_tokens=6, ignore_eos=True)
    tiny_nucleus = llm.generate(MIXED_PROMPTS, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=1,
                                ignore_eos=True)
    assert tiny_nucleus == greedy


def test_stop_strings_cut_each_sequence_at_its_own_stop(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False)
    prompts = ["hello", "ab", "the quick brown"]
    free = llm.generate_text(prompts, max_new_tokens=12, ignore_eos=True)
    # stop at a character each continuation really produces, at different places
    stops = [text[3] if len(text) > 3 else text[-1] for text in free]
    for prompt, text, stop in zip(prompts, free, stops):
        cut = llm.generate_text([prompt], max_new_tokens=12, stop=stop, ignore_eos=True)[0]
        assert cut == text[: text.index(stop)]
        ids = llm.generate([llm.encode(prompt)], max_new_tokens=12, stop=stop, ignore_eos=True)[0]
        assert llm.tokenizer.decode(ids).endswith(stop)       # ids keep the stop, text drops it


def test_stop_token_id_and_eos_stop_generation(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False)
    free = llm.generate(MIXED_PROMPTS, max_new_tokens=10, ignore_eos=True)
    stop_id = free[0][4]
    got = llm.generate(MIXED_PROMPTS, max_new_tokens=10, stop=stop_id, ignore_eos=True)
    assert got[0] == free[0][: free[0].index(stop_id) + 1]
    for want, row in zip(free, got):
        assert row == (want[: want.index(stop_id) + 1] if stop_id in want else want)


def test_zero_new_tokens_returns_empty_lists(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False)
    assert llm.generate(MIXED_PROMPTS, max_new_tokens=0) == [[] for _ in MIXED_PROMPTS]


def test_every_prompt_answered_when_the_batch_does_not_divide(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False, policy=Policy(gpu_batch_size=4, num_gpu_batches=3))
    prompts = MIXED_PROMPTS * 3                           # 18 prompts, blocks of 12
    got = llm.generate(prompts, max_new_tokens=3, ignore_eos=True)
    assert len(got) == 18 and all(len(g) == 3 for g in got)
    assert got[:6] == got[6:12] == got[12:]
