"""Fakes for wrangling_tasks tests: an llm and a tokenizer that need no model."""

from __future__ import annotations

import hashlib


class WordTokenizer:
    """Whitespace 'tokenizer': one token per word (the ids are the words)."""

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": texts.split()}
        return {"input_ids": [t.split() for t in texts]}

    def encode(self, text):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


class FakeLLM:
    """Answers from the prompt text itself, so a misaligned answer is detectable.

    ``answer(prompt)`` decides the text; every call is recorded.
    """

    def __init__(self, answer=None, tokenizer=None, max_context=None):
        self.answer = answer or (lambda p: " Yes\nignored" if _digest(p) % 2 else " No.")
        self.calls: list[dict] = []
        if tokenizer is not None:
            self.tokenizer = tokenizer
            self.max_context = max_context

    def generate_text(self, prompts, max_new_tokens, stop="\n", do_sample=False, **kwargs):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "stop": stop,
                           "do_sample": do_sample, **kwargs})
        return [self.answer(p) for p in prompts]


class ChoiceLLM(FakeLLM):
    """Also has score_choices: prefers the first choice when the prompt digest is odd."""

    def score_choices(self, prompts, choices):
        self.calls.append({"prompts": list(prompts), "choices": list(choices)})
        return [[-1.0, -2.0] if _digest(p) % 2 else [-2.0, -1.0] for p in prompts]


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def expected_yes(prompt: str) -> bool:
    """What FakeLLM's default answer means for ``prompt``."""
    return bool(_digest(prompt) % 2)
