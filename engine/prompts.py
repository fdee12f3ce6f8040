"""Prompt checks and stops: what generate() accepts, and where each sequence ends.

Pure functions over token-id lists, shared by LLM (engine.generate) and PipelineLLM (engine.distributed).
"""
from __future__ import annotations

import torch

from .config import ModelConfig


def check_prompts(prompt_ids, max_new_tokens, config: ModelConfig) -> list[list[int]]:
    """The prompts as lists of ints, or a ValueError/TypeError that says what to change."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or (prompt_ids and not isinstance(prompt_ids[0], (list, tuple))):
        raise TypeError("prompt_ids must be a list of token-id lists, e.g. [[2, 100, 200]]; "
                        "for text use generate_text()")
    out = []
    for n, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {n} is empty; every prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = next(t for t in p if not isinstance(t, int) or isinstance(t, bool))
            raise TypeError(f"prompt {n} holds {bad!r} ({type(bad).__name__}); token ids must be ints")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {n} has token id {min(p) if min(p) < 0 else max(p)} outside the "
                             f"vocabulary [0, {config.vocab_size})")
        if len(p) + max_new_tokens > config.max_positions:
            raise ValueError(f"prompt {n} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                             f"exceeds the context window of {config.max_positions}: shorten it "
                             "(fewer demonstrations) or generate fewer tokens")
        out.append(list(p))
    return out


def stop_sets(stop, ignore_eos: bool, config: ModelConfig, tokenizer) -> tuple[set[int], list[str]]:
    """(stop token ids, stop strings) from generate()'s `stop`; end-of-sequence ids unless ignore_eos."""
    ids: set[int] = set()
    strings: list[str] = []
    for item in ([] if stop is None else stop if isinstance(stop, (list, tuple)) else [stop]):
        if isinstance(item, int) and not isinstance(item, bool):
            ids.add(item)
        elif isinstance(item, str) and item:
            strings.append(item)
        else:
            raise TypeError(f"stop must be a token id, a non-empty string or a list of them; got {item!r}")
    if strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none, so pass stop token ids")
    if not ignore_eos:
        ids |= {t for t in (config.eos_token_id, *config.extra_eos_token_ids) if t is not None}
    return ids, strings


def hits_stop(tokenizer, tokens: list[int], stop_strings: list[str]) -> bool:
    """Whether the text of the last tokens contains a stop string."""
    text = tokenizer.decode(tokens[-16:], skip_special_tokens=False)
    return any(s in text for s in stop_strings)


def cut_at_stop(tokenizer, tokens: list[int], stop_strings: list[str]) -> list[int]:
    """Tokens up to and with the first one that completes a stop string."""
    if not stop_strings:
        return tokens
    for n in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:n], skip_special_tokens=False) for s in stop_strings):
            return tokens[:n]
    return tokens


def common_prefix_len(prompts: list[list[int]], keep: int = 1) -> int:
    """Longest common token prefix, leaving every prompt at least `keep` tokens of its own."""
    n = min(len(p) for p in prompts) - keep
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


def cut_text(text: str, stops: list[str]) -> str:
    """Text before the first stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


_SLOT = "\x00prompt\x00"        # stands for the prompt while the chat template is rendered


def encode_text(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt string; what the text spells is never a control token.

    A tokenizer called plainly turns the string "<|im_end|>" anywhere in its input into the control
    token, so a table cell holding it would end the turn. The prompt's text is tokenized with special
    tokens split (the model reads those characters as characters), and with `chat` the template's own
    control tokens are tokenized from the rendered template alone, around the prompt's ids. Text
    without special-token strings gets the ids a plain call gives: the template ends each piece at
    a control token or a newline, where the tokenizer splits anyway.
    """
    if not chat:
        return tokenizer(text, split_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; call with chat=False")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(_SLOT) != 1:
        raise ValueError("the chat template does not show the user message exactly once, as written; "
                         "call with chat=False and put the template's text in the prompt")
    before, after = rendered.split(_SLOT)
    pieces = [tokenizer(before, add_special_tokens=False)["input_ids"],
              tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"],
              tokenizer(after, add_special_tokens=False)["input_ids"]]
    return [t for piece in pieces for t in piece]
