"""run(): items -> prompts -> batched greedy inference -> parsed answers -> metrics."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from wrangling_tasks.base import InputError, Prepared, RunResult, TaskSpec
from wrangling_tasks.fewshot import choose_demos, format_demo, format_prefix
from wrangling_tasks.registry import get_task

log = logging.getLogger(__name__)

CONTEXT_MARGIN = 2  # tokens kept free for BOS and tokenizer boundary effects
TRUNCATION_MARK = " ..."


def prepare(
    task: Any,
    inputs: Any,
    llm: Any = None,
    *,
    k: int = 0,
    seed: int = 0,
    spec: TaskSpec | None = None,
    limit: int | None = None,
) -> Prepared:
    """Build every prompt without running a model (``run`` = ``prepare`` + inference + scoring).

    ``llm`` is optional: only its ``tokenizer`` and ``max_context`` are used, to fit
    prompts into the context window. Returns the items in input order with their
    key columns, ``prompt``, ``prompt_hash``, ``label``, ``n_demos``, ``truncated``.
    """
    mod = get_task(task)
    spec = _fill_defaults(spec or getattr(inputs, "spec", None) or mod.default_spec(), mod)
    inputs = mod.coerce_inputs(inputs, spec)
    items = mod.make_items(inputs, spec)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1 (or None for all items), got {limit}.")
        items = items.iloc[:limit].reset_index(drop=True)
    keys = tuple(mod.keys_for(inputs))
    warnings: list[str] = []

    demo_texts: list[str] = []
    if k > 0:
        pool = mod.demo_pool(inputs, spec)
        demos = choose_demos(pool, k, seed, balanced=mod.allowed_answers is not None)
        demo_texts = [format_demo(b + q + spec.answer_prefix, mod.format_answer(lab))
                      for b, q, lab in zip(demos["body"], demos["question"], demos["label"])]
        if len(demo_texts) < k:
            warnings.append(f"asked for k={k} demonstrations but only {len(pool)} labelled examples "
                            f"outside the items are available; using {len(demo_texts)}.")

    tails = [q + spec.answer_prefix for q in items["question"]]
    bodies, n_demos, truncated = _fit_context(llm, demo_texts, list(items["body"]), tails,
                                              spec.max_new_tokens, warnings)
    prompts = [format_prefix(demo_texts[:j]) + b + t for b, t, j in zip(bodies, tails, n_demos)]
    out = items[list(keys)].copy()
    out["prompt"] = prompts
    out["prompt_hash"] = [prompt_hash(p) for p in prompts]
    out["label"] = items["label"]
    out["n_demos"] = np.asarray(n_demos, dtype=np.int64)
    out["truncated"] = np.asarray(truncated, dtype=bool)
    for w in warnings:
        log.warning(w)
    return Prepared(task=mod.NAME, items=out, key_columns=keys, allowed_answers=mod.allowed_answers,
                    spec=spec, prefix=format_prefix(demo_texts), n_demos=len(demo_texts), warnings=warnings)


def run(
    task: Any,
    inputs: Any,
    llm: Any,
    *,
    k: int = 0,
    seed: int = 0,
    spec: TaskSpec | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    use_choice_scoring: bool = False,
    generate_kwargs: Mapping[str, Any] | None = None,
) -> RunResult:
    """Answer every item of ``inputs`` with ``llm``; return predictions in input order.

    ``task``: a name from ``TASKS`` or a task module. ``k`` demonstrations (seeded,
    class-balanced for Yes/No tasks) form one prefix shared by all prompts; rows
    too long for ``llm.max_context`` get fewer demonstrations, and a row too long
    on its own has its serialised text truncated (``truncated`` column, warning).
    ``spec`` overrides ``inputs.spec`` (set by ``load_benchmark``) and the task
    defaults. ``limit`` keeps the first items. Prompts are sorted by length into
    batches of ``batch_size``; decoding is greedy with a newline stop.
    ``use_choice_scoring`` answers Yes/No tasks with ``llm.score_choices`` when the
    llm has it. ``generate_kwargs`` are passed on to ``llm.generate_text`` (e.g.
    ``{"chat": True}`` for the engine's chat template, which a small instruct model
    needs to answer at k = 0). Metrics are computed over the items that have a label.
    """
    start = time.perf_counter()
    mod = get_task(task)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    prep = prepare(mod, inputs, llm, k=k, seed=seed, spec=spec, limit=limit)
    prompts, warnings = list(prep.items["prompt"]), list(prep.warnings)

    gen_start = time.perf_counter()
    if use_choice_scoring and mod.choices and hasattr(llm, "score_choices"):
        raw = _score_choices(llm, prompts, mod.choices, batch_size, progress)
    else:
        if use_choice_scoring:
            warnings.append("use_choice_scoring ignored: the task has free-text answers or the llm "
                            "has no score_choices(); generating instead.")
            log.warning(warnings[-1])
        raw = _generate(llm, prompts, prep.spec.max_new_tokens, batch_size, progress, dict(generate_kwargs or {}))
    gen_seconds = time.perf_counter() - gen_start

    preds = prep.items
    preds.insert(preds.columns.get_loc("label"), "raw_output", pd.array(raw, dtype="string"))
    answers = [mod.parse(r) for r in raw]
    preds.insert(preds.columns.get_loc("label"), "answer",
                 pd.array(answers, dtype="boolean" if mod.allowed_answers else "string"))
    metrics = None
    if preds["label"].notna().any():
        metrics = mod.score(_none(preds["answer"]), _none(preds["label"]))
    seconds = time.perf_counter() - start
    return RunResult(
        task=mod.NAME,
        predictions=preds,
        metrics=metrics,
        seconds=seconds,
        rows_per_s=len(preds) / seconds if seconds > 0 else float("inf"),
        key_columns=prep.key_columns,
        allowed_answers=mod.allowed_answers,
        prefix=prep.prefix,
        n_demos=prep.n_demos,
        generate_seconds=gen_seconds,
        spec=prep.spec,
        warnings=warnings,
    )


def prompt_hash(prompt: str) -> str:
    """First 16 hex digits of the prompt's sha256: a stable id for caching and dedup."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _none(values: pd.Series) -> list[Any]:
    """pd.NA -> None, so parsers and scorers see plain Python values."""
    return [None if pd.isna(v) else v for v in values]


def _fill_defaults(spec: TaskSpec, mod: Any) -> TaskSpec:
    defaults = mod.default_spec()
    return spec.replace(
        question=spec.question or defaults.question,
        max_new_tokens=spec.max_new_tokens or defaults.max_new_tokens,
    )


def _length_order(prompts: Sequence[str]) -> list[int]:
    """Indices sorted by prompt length, longest first (stable), to cut padding in batches."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def _batches(prompts: Sequence[str], batch_size: int):
    order = _length_order(prompts)
    for start in range(0, len(order), batch_size):  # the last, partial batch is kept
        idx = order[start:start + batch_size]
        yield idx, [prompts[i] for i in idx]


def _generate(llm: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int, progress: bool,
              kwargs: dict[str, Any]) -> list[str]:
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), unit="row", disable=not progress, desc="wrangling") as bar:
        for idx, batch in _batches(prompts, batch_size):
            texts = llm.generate_text(batch, max_new_tokens=max_new_tokens, stop="\n", do_sample=False, **kwargs)
            if len(texts) != len(batch):
                raise RuntimeError(f"llm.generate_text returned {len(texts)} texts for {len(batch)} prompts.")
            for i, t in zip(idx, texts):
                out[i] = t
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def _score_choices(llm: Any, prompts: Sequence[str], choices: Sequence[str], batch_size: int,
                   progress: bool) -> list[str]:
    spaced = [" " + c for c in choices]  # demonstrations put one space before the answer
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), unit="row", disable=not progress, desc="scoring") as bar:
        for idx, batch in _batches(prompts, batch_size):
            scores = llm.score_choices(batch, spaced)
            if len(scores) != len(batch):
                raise RuntimeError(f"llm.score_choices returned {len(scores)} rows for {len(batch)} prompts.")
            for i, s in zip(idx, scores):
                out[i] = choices[int(np.argmax(s))]
            bar.update(len(batch))
    return out  # type: ignore[return-value]


# --- fitting prompts into the context window -------------------------------------------------


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    """Ids of each text as the engine tokenizes prompt text: special-token strings split into
    ordinary tokens (engine.prompts.encode_text), so a cell spelling "<|im_end|>" is counted at its
    real length. A tokenizer without that option (a plain ``encode``) is used as it is."""
    try:
        return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:
        return [tokenizer.encode(t) for t in texts]


def _count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(x) for x in _token_ids(tokenizer, texts)] if texts else []


def _fit_context(llm: Any, demos: list[str], bodies: list[str], tails: list[str], max_new_tokens: int,
                 warnings: list[str]) -> tuple[list[str], list[int], list[bool]]:
    """Per row: how many demonstrations fit, and the (possibly truncated) body."""
    n = len(bodies)
    tokenizer, max_context = getattr(llm, "tokenizer", None), getattr(llm, "max_context", None)
    if tokenizer is None or not max_context:
        return bodies, [len(demos)] * n, [False] * n
    budget = int(max_context) - max_new_tokens - CONTEXT_MARGIN
    prefix_lens = np.array(_count_tokens(tokenizer, [format_prefix(demos[:j]) for j in range(len(demos) + 1)]))
    prefix_lens[0] = 0
    query_lens = np.array(_count_tokens(tokenizer, [b + t for b, t in zip(bodies, tails)]))
    # prefix_lens grows with j: the largest j with prefix_lens[j] + query_len <= budget
    fits = np.searchsorted(prefix_lens, budget - query_lens, side="right") - 1
    n_demos = np.maximum(fits, 0).tolist()
    truncated = (query_lens > budget).tolist()
    fewer = int(((fits >= 0) & (fits < len(demos))).sum())
    if fewer:
        warnings.append(f"{fewer} row(s) got fewer than {len(demos)} demonstrations to fit max_context={max_context}.")
    if any(truncated):
        bodies = list(bodies)
        for i in np.flatnonzero(truncated):
            bodies[i] = _truncate(tokenizer, bodies[i], tails[i], budget)
        warnings.append(f"{sum(truncated)} row(s) alone exceed max_context={max_context}: their serialised "
                        "text was truncated (see the 'truncated' column).")
    return bodies, n_demos, truncated


def _truncate(tokenizer: Any, body: str, tail: str, budget: int) -> str:
    keep = budget - _count_tokens(tokenizer, [tail + TRUNCATION_MARK])[0]
    if keep < 1:
        raise InputError(f"the question alone ({tail!r}) does not fit the context window; shorten it.")
    ids = _token_ids(tokenizer, [body])[0]
    # decoding can merge differently; shrink until the re-encoded text fits
    while keep > 0:
        text = tokenizer.decode(ids[:keep]) + TRUNCATION_MARK
        if _count_tokens(tokenizer, [text + tail])[0] <= budget:
            return text
        keep -= max(1, keep // 20)
    return TRUNCATION_MARK.strip()
