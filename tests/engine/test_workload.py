"""Wrangling-shaped workloads: shared-prefix reuse, bucketing, early exit and choice scoring."""
import pytest
import torch
from enginekit import POLICIES

from engine import LLM, Policy

PREFIX = [1] + list(range(20, 44))                     # a 25-token "few-shot prefix"
SUFFIXES = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16], [3, 4], [40, 41, 42, 43], [50, 51]]
PROMPTS = [PREFIX + s for s in SUFFIXES] * 2


@pytest.fixture(scope="module")
def no_reuse(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False, policy=Policy(gpu_batch_size=12))
    return llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True, share_prefix=False, bucket=False)


@pytest.mark.parametrize("name", POLICIES)
def test_prefix_reuse_gives_the_tokens_of_no_reuse(name, tiny_opt, no_reuse, tmp_path):
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, **POLICIES[name])
    llm = LLM.from_pretrained(tiny_opt[0], policy=policy, offload_dir=tmp_path, progress=False)
    assert llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True) == no_reuse
    assert llm.last_stats["prefix_len"] == len(PREFIX)


def test_prefix_reuse_on_llama_with_grouped_query_attention(tiny_llama):
    llm = LLM.from_pretrained(tiny_llama[0], progress=False, policy=Policy(gpu_batch_size=4, num_gpu_batches=2))
    plain = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True, share_prefix=False)
    assert llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True) == plain


def test_bucketing_keeps_input_order(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False, policy=Policy(gpu_batch_size=2, num_gpu_batches=2))
    unsorted = llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True, bucket=False, share_prefix=False)
    padded = llm.last_stats["prefill_positions"]
    assert llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True, bucket=True, share_prefix=False) == unsorted
    # blocks of 4 sorted by length pad each prompt to its block's longest
    lengths = sorted(len(p) for p in PROMPTS)
    assert llm.last_stats["prefill_positions"] == sum(4 * max(lengths[i: i + 4]) for i in range(0, 12, 4)) < padded
    llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True, bucket=True)
    suffixes = sorted(len(s) for s in SUFFIXES * 2)
    assert llm.last_stats["prefill_positions"] == len(PREFIX) + sum(4 * max(suffixes[i: i + 4]) for i in range(0, 12, 4))


def test_stopped_micro_batches_are_skipped(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False, policy=Policy(gpu_batch_size=2, num_gpu_batches=3))
    free = llm.generate(PROMPTS[:6], max_new_tokens=10, ignore_eos=True)
    first_tokens = {row[0] for row in free}
    llm.generate(PROMPTS[:6], max_new_tokens=10, ignore_eos=True, stop=sorted(first_tokens))
    assert llm.last_stats["decode_steps"] == 0          # every sequence stopped on its first token


def _reference_scores(model, prompt, choices):
    out = []
    for c in choices:
        ids = torch.tensor([prompt + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        out.append(sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c)))
    return out


@pytest.mark.parametrize("choices", [[[7], [8], [9]], [[7, 8], [9], [10, 11, 12]]])
def test_choice_scores_equal_forward_pass_log_probs(choices, tiny_opt):
    path, model = tiny_opt
    llm = LLM.from_pretrained(path, dtype="float32", progress=False, policy=Policy(gpu_batch_size=4))
    got = llm.score_choices(PROMPTS[:6], choices)
    for prompt, row in zip(PROMPTS[:6], got):
        assert row == pytest.approx(_reference_scores(model, prompt, choices), abs=1e-4)


def test_choice_scores_from_strings(tiny_opt):
    path, model = tiny_opt
    llm = LLM.from_pretrained(path, dtype="float32", progress=False)
    got = llm.score_choices(["Is it so? ", "Maybe? "], ["Yes", "No"])
    choice_ids = [llm.tokenizer(c, add_special_tokens=False)["input_ids"] for c in ["Yes", "No"]]
    want = [_reference_scores(model, llm.encode(p), choice_ids)
            for p in ["Is it so? ", "Maybe? "]]
    assert got == [pytest.approx(w, abs=1e-4) for w in want]
