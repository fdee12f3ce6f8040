"""The steps of a wrangle run as plain functions (no Prefect): :func:`flows.runner.run_wrangle`
calls them, and the flows decorate them as Prefect tasks.

extract (DuckDB, read-only) -> prompt -> infer -> parse -> validate (Great Expectations)
-> load (DuckDB, one transaction per chunk) -> finish (whole-run check, metrics, run record).

Every check on the caller's input (tables, columns, rows, the model) runs before the first
write, so a bad input leaves the database untouched.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import wrangling_tasks as wt
from wrangling_tasks import tables
from wrangling_tasks.base import InputError, TaskSpec, is_missing

from flows import resume, store
from flows.llms import policy_json
from flows.params import TASK_TABLES, WrangleParams, resolve_spec
from flows.resume import key_text, pending, row_identity  # noqa: F401  (part of this module's API)

__all__ = ["WrangleParams", "extract", "build_prompts", "infer", "parse", "validate", "load",
           "check_whole_run"]

# --- extract ---------------------------------------------------------------------------------


@dataclass
class Extracted:
    """Task inputs read from DuckDB, with the spec to prompt them."""

    inputs: Any
    spec: TaskSpec
    rows: dict[str, int]      # table -> rows read
    present: pd.DataFrame     # row_key, occurrence of every item, in input order (limit aside)


def extract(params: WrangleParams) -> Extracted:
    """Read the input tables (read-only connection) and check they make valid task inputs."""
    spec = resolve_spec(params)
    mod = wt.get_task(params.task)
    with tables.connect(params.database, read_only=True) as con:
        frames = {p: _read(con, getattr(params, p), p, params, spec)
                  for p in TASK_TABLES[params.task] if getattr(params, p)}
        store.check_output_names(con)          # the run would write there: refuse before any write
    inputs = mod.inputs_from_tables(frames, spec)
    coerced = mod.coerce_inputs(inputs, spec)
    items = mod.make_items(coerced, spec)  # layout, ids, labels: fail before writes
    return Extracted(inputs, spec, {getattr(params, p): len(f) for p, f in frames.items()},
                     resume.identities(items, mod.keys_for(coerced), mod.keyed_by_content(coerced)))


def _read(con: Any, name: str, param: str, params: WrangleParams, spec: TaskSpec) -> pd.DataFrame:
    tables.require_table(con, name, wt.get_task(params.task).required_columns(param, spec, params.columns))
    return tables.read_table(con, name)


# --- prompt ----------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Every item of the run, in input order, with its prompt and identity."""

    items: pd.DataFrame  # row_key, occurrence, keys..., prompt, prompt_hash, label, n_demos, truncated
    key_columns: tuple[str, ...]
    max_new_tokens: int
    warnings: list[str]


def build_prompts(params: WrangleParams, extracted: Extracted, llm: Any) -> Prompts:
    """Prompts for the first ``limit`` items: one shared few-shot prefix for all of them.

    ``llm`` lends its tokenizer and context size to fit prompts (no inference here). Each item
    carries its identity (``row_key``, ``occurrence``: :mod:`flows.resume`).
    """
    prep = wt.prepare(params.task, extracted.inputs, llm, k=params.k, seed=params.seed,
                      spec=extracted.spec, limit=params.limit)
    keys = tuple(prep.key_columns)
    items = prep.items.reset_index(drop=True)
    ids = extracted.present.iloc[:len(items)]
    if len(ids) != len(items):   # both come from the same make_items over the same inputs
        raise RuntimeError(f"{len(items)} prompts for {len(ids)} extracted items")
    items.insert(0, "row_key", ids["row_key"].tolist())
    items.insert(1, "occurrence", ids["occurrence"].astype(int).tolist())
    return Prompts(items, keys, int(prep.spec.max_new_tokens), list(prep.warnings))


def chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i:i + size] for i in range(0, len(frame), size)]


# --- the engine's budget and workload ---------------------------------------------------------


@dataclass
class Budget:
    """The engine's caps and offload folder for one run; `created`: the folder this run made (and removes)."""

    caps: dict[str, Any]
    created: Path | None = None

    def release(self, llm: Any) -> None:
        """Free the engine's tiers (its offload files go with them) and the folder this run made."""
        close = getattr(llm, "close", None)
        if close is not None:
            close()
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def budget(params: WrangleParams, run_id: str) -> Budget:
    """The engine's budget from the flow's parameters. Without ``offload_dir`` the disk tier gets a
    folder of its own for this run next to the database (``<database folder>/offload/<run id>``),
    removed after the run; a folder that cannot be created is an input error, before any write."""
    caps = {"gpu_mem": params.gpu_mem, "cpu_mem": params.cpu_mem, "disk_mem": params.disk_mem}
    folder = Path(params.offload_dir) if params.offload_dir else \
        Path(params.database).resolve().parent / "offload" / run_id.replace("/", "_")
    created = None if params.offload_dir or folder.exists() else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"offload_dir {str(folder)!r} cannot be created ({exc}); pass offload_dir= a folder "
                         "on a local disk you can write to") from exc
    return Budget({**caps, "offload_dir": str(folder)}, created)


def workload(prompts: Prompts, tokenizer: Any) -> tuple[int, int] | None:
    """(prompt tokens, new tokens) an automatic engine policy is searched for: the longest row's tokens
    after the prefix all prompts share (the engine computes that prefix once per batch and keeps one
    copy of its cache), and the task's new tokens. None without a tokenizer or rows."""
    if tokenizer is None or prompts.items.empty:
        return None
    from engine.prompts import common_prefix_len

    ids = tokenizer(list(prompts.items["prompt"]))["input_ids"]
    return max(1, max(map(len, ids)) - common_prefix_len(ids)), prompts.max_new_tokens


# --- infer / parse ---------------------------------------------------------------------------


@dataclass
class Inference:
    raw: list[str]
    seconds: float
    tokens: int | None  # generated tokens, when the model has a tokenizer


def infer(llm: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
          chat: bool = False) -> Inference:
    """Greedy generation with a newline stop, longest prompts first in batches of ``batch_size``.

    ``chat`` wraps prompts in the model's chat template (engine models only).
    """
    extra = {"chat": True} if chat else {}
    start = time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    raw: list[str | None] = [None] * len(prompts)
    tokens: int | None = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        texts = llm.generate_text([prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                  stop="\n", do_sample=False, **extra)
        if len(texts) != len(idx):
            raise RuntimeError(f"the model returned {len(texts)} texts for {len(idx)} prompts")
        for i, t in zip(idx, texts):
            raw[i] = t
        new = _new_tokens(llm)
        tokens = None if new is None or tokens is None else tokens + new
    seconds = time.perf_counter() - start
    return Inference([r or "" for r in raw], seconds, tokens)


def _new_tokens(llm: Any) -> int | None:
    """Tokens the model generated in its last call, when it reports them (engine.LLM does)."""
    stats = getattr(llm, "last_stats", None)
    if isinstance(stats, dict) and isinstance(stats.get("new_tokens"), int):
        return stats["new_tokens"]
    return None


def parse(task: str, raw: Sequence[str]) -> list[Any]:
    """Model text -> typed answers (None when unparseable)."""
    mod = wt.get_task(task)
    return [mod.parse(r) for r in raw]


def predictions(chunk: pd.DataFrame, raw: Sequence[str], answers: Sequence[Any],
                task: str) -> pd.DataFrame:
    """The chunk's items with their raw output and parsed answer."""
    mod = wt.get_task(task)
    out = chunk.reset_index(drop=True).copy()
    out["raw_output"] = pd.array(list(raw), dtype="string")
    out["answer"] = pd.array(list(answers), dtype="boolean" if mod.allowed_answers else "string")
    return out


# --- validate / load -------------------------------------------------------------------------


def validate(task: str, preds: pd.DataFrame, keys: Sequence[str], expected_rows: int) -> Any:
    """Great Expectations over outputs: keys, answers, row count (see wrangling_tasks.checks)."""
    from wrangling_tasks import checks

    check = checks.validate_outputs(preds, keys, allowed_answers=wt.get_task(task).allowed_answers,
                                    expected_rows=expected_rows)
    if check.table_reasons:
        check.raise_for_failure()  # a table-level failure is a bug upstream: stop the run
    return check


@dataclass(frozen=True)
class RunContext:
    """What every written row carries about its run."""

    task: str
    run_key: str
    run_id: str
    model: str
    policy: str  # JSON text
    spec: TaskSpec | None = None  # the run's spec: some tasks record fields of it in each row (the target)

    @classmethod
    def of(cls, params: WrangleParams, run_key: str, run_id: str, spec: TaskSpec) -> "RunContext":
        """The context of attempt ``run_id`` of run ``run_key`` over ``params``."""
        return cls(task=params.task, run_key=run_key, run_id=run_id, model=params.model,
                   policy=policy_json(params.policy), spec=spec)


def identity_rows(ctx: RunContext, items: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``run_key, row_key, occurrence``, the task's key columns (as text; NULL when unused) and
    ``label`` of ``items``: the columns a results row takes from its item."""
    n = len(items)
    out = pd.DataFrame({"run_key": [ctx.run_key] * n, "row_key": items["row_key"].tolist(),
                        "occurrence": items["occurrence"].astype("int32").tolist()})
    for col in store.KEY_COLUMNS[ctx.task]:
        values = items[col] if col in keys else [None] * n
        out[col] = pd.array([key_text(v) for v in values], dtype="string")
    out["label"] = items["label"].to_numpy()
    return out


def result_rows(ctx: RunContext, preds: pd.DataFrame, keys: Sequence[str], check: Any) -> pd.DataFrame:
    """Rows for the task's results table (keys as text, valid flag from the check)."""
    n = len(preds)
    out = identity_rows(ctx, preds, keys).drop(columns="label")
    for name in wt.get_task(ctx.task).RESULT_SPEC_FIELDS:
        out[name] = getattr(ctx.spec, name)
    out["prompt_hash"] = preds["prompt_hash"].tolist()
    out["raw_output"] = preds["raw_output"].to_numpy()
    out["answer"] = preds["answer"].to_numpy()
    out["label"] = preds["label"].to_numpy()
    out["valid"] = [check.reason(i) is None for i in range(n)]
    out["n_demos"] = preds["n_demos"].astype("int32").to_numpy()
    out["truncated"] = preds["truncated"].astype(bool).to_numpy()
    out["run_id"] = ctx.run_id
    out["model"] = ctx.model
    out["policy"] = ctx.policy
    out["created_at"] = store.utcnow()
    return out


def quarantine_rows(ctx: RunContext, preds: pd.DataFrame, keys: Sequence[str], check: Any) -> pd.DataFrame:
    """One row per failing prediction, with the reason(s) it failed."""
    rows = []
    now = store.utcnow()
    for i in check.failed_rows:
        r = preds.iloc[i]
        answer = r["answer"]
        rows.append({
            "run_key": ctx.run_key, "row_key": r["row_key"], "occurrence": int(r["occurrence"]),
            "reason": check.reason(i), "task": ctx.task,
            "keys": json.dumps({k: key_text(r[k]) for k in keys},
                               ensure_ascii=False),
            "raw_output": None if is_missing(r["raw_output"]) else str(r["raw_output"]),
            "answer": None if is_missing(answer) else str(answer),
            "run_id": ctx.run_id, "quarantined_at": now,
        })
    cols = [c for c, _ in store.QUARANTINE_COLUMNS]
    return pd.DataFrame(rows, columns=cols)


def load(database: str, ctx: RunContext, results: pd.DataFrame, quarantine: pd.DataFrame) -> int:
    """Write one chunk (results + quarantine) in one transaction; the rows inserted."""
    with tables.connect(database) as con:
        return store.write_chunk(con, ctx.task, results, quarantine)


# --- start -----------------------------------------------------------------------------------


@dataclass
class Started:
    """What a run's stored rows say when an attempt starts."""

    answered: pd.DataFrame   # row_key, occurrence, prompt_hash of every stored row of the run
    stale_rows: int          # stored rows no longer in the input (kept, not scored)


def start(database: str, record: dict[str, Any], ctx: RunContext, items: pd.DataFrame, keys: Sequence[str],
          present: pd.DataFrame) -> Started:
    """Create the output tables if needed, record the attempt (its caller holds the run's lock), bring
    the run's stored rows in line with the input (:func:`flows.store.reconcile`), read what is answered."""
    with tables.connect(database) as con:
        store.ensure_schema(con)
        store.start_run(con, record)
        stale = store.reconcile(con, ctx.task, ctx.run_key, identity_rows(ctx, items, keys), present)
        return Started(store.answered_rows(con, ctx.task, ctx.run_key), stale)


# --- finish ----------------------------------------------------------------------------------


def check_whole_run(database: str, ctx: RunContext, items: pd.DataFrame,
                    keys: Sequence[str]) -> dict[str, Any]:
    """Validate the run's complete output (keys unique across chunks, one row per item), make the
    quarantine of its items what this check finds, and score it. Returns counts and metrics, and
    how many rows this attempt (``ctx.run_id``) wrote."""
    from wrangling_tasks import checks

    mod = wt.get_task(ctx.task)
    ids = items[["row_key", "occurrence"]].astype({"occurrence": "int64"})
    with tables.connect(database, read_only=True) as con:
        written = store.read_results(con, ctx.task, ctx.run_key)
    written = written.astype({"occurrence": "int64"}).merge(ids, on=["row_key", "occurrence"])
    # keys as the items had them (typed), so uniqueness is judged on the real key values
    frame = items[["row_key", "occurrence", *keys]].merge(
        written[["row_key", "occurrence", "answer", "label", "raw_output", "valid"]],
        on=["row_key", "occurrence"], how="inner")
    frame["answer"] = [None if is_missing(a) else a for a in frame["answer"]]
    check = checks.validate_outputs(frame, keys, allowed_answers=mod.allowed_answers,
                                    expected_rows=len(items))
    quarantine = quarantine_rows(ctx, frame, keys, check)
    with tables.connect(database) as con:
        store.settle_quarantine(con, ctx.task, ctx.run_key, ids, quarantine)
        quarantined = store.count_quarantined(con, ctx.run_key, ids)
        written_here = store.written_by(con, ctx.task, ctx.run_key, ctx.run_id)
    metrics = None
    labels = [None if is_missing(v) else v for v in frame["label"]]
    if any(v is not None for v in labels):
        metrics = mod.score(list(frame["answer"]), labels)
    return {"output_rows": len(frame), "quarantined_rows": quarantined,
            "valid_rows": len(frame) - quarantined, "metrics": metrics,
            "table_failures": check.table_reasons, "written_rows": written_here}
