"""One wrangle run as plain code (no Prefect): :func:`run_wrangle` reads the input tables, builds the
prompts, loads the model, answers the pending rows chunk by chunk, checks them and hands them to a
writer (:mod:`flows.writers`: DuckDB tables or Parquet files).

    extract -> hold the run -> prompt -> load model -> start -> [per chunk: infer -> parse -> validate
    -> write] -> finish -> complete

Everything that can fail on the caller's input (tables, columns, rows, the model's name) fails
before the first write. The flows (``wrangle``, ``wrangle-partition``) are thin shells: they build
:class:`~flows.params.WrangleParams` and pass their Prefect tasks as :class:`RunSteps`, so each step
shows as a task run with its retries; called without them, every step is the plain function.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from flows import llms, resume, runlock, steps, store
from flows.params import WrangleParams
from flows.writers import Tally, Writer

__all__ = ["RunSteps", "run_wrangle", "run_record", "local_run_id"]

log = logging.getLogger(__name__)


def _logger() -> logging.Logger:
    return log


def _start(writer: Writer, *args: Any) -> steps.Started:
    return writer.start(*args)


def _write(writer: Writer, *args: Any) -> int:
    return writer.write(*args)


def _finish(writer: Writer, *args: Any) -> dict[str, Any]:
    return writer.finish(*args)


@dataclass(frozen=True)
class RunSteps:
    """The steps :func:`run_wrangle` calls, plain by default. The writer steps take the writer first."""

    extract: Callable[..., steps.Extracted] = steps.extract
    model_shape: Callable[..., Any] = llms.model_shape
    prompt: Callable[..., steps.Prompts] = steps.build_prompts
    load_model: Callable[..., Any] = llms.load_llm
    start: Callable[..., steps.Started] = _start
    infer: Callable[..., steps.Inference] = steps.infer
    parse: Callable[..., list[Any]] = steps.parse
    validate: Callable[..., Any] = steps.validate
    write: Callable[..., int] = _write
    finish: Callable[..., dict[str, Any]] = _finish
    log: Callable[[], Any] = _logger   # the flows log to the run's logger


def local_run_id(run_key: str) -> str:
    """An attempt's id when no Prefect flow run names it."""
    return f"local-{run_key}-{time.time_ns()}"


def run_record(params: WrangleParams, ctx: steps.RunContext, holder: dict[str, Any], input_rows: int,
               run_name: str | None = None, extra_parameters: dict[str, Any] | None = None,
               **fields: Any) -> dict[str, Any]:
    """The ``wrangle_runs`` row an attempt starts with (:func:`flows.store.start_run`)."""
    parameters = params.identity() | {"limit": params.limit, "database": params.database} | (extra_parameters or {})
    return {"run_id": ctx.run_id, "run_key": ctx.run_key, "flow_run_name": run_name, "task": ctx.task,
            "parameters": llms.policy_json(parameters), "model": params.model, "policy": ctx.policy,
            "input_rows": input_rows, "host": holder["host"], "pid": holder["pid"], **fields}


def run_wrangle(params: WrangleParams, writer: Writer, *, run_id: str | None = None, run_name: str | None = None,
                run_steps: RunSteps = RunSteps()) -> dict[str, Any]:
    """Answer every pending row of ``params``' table with its model into ``writer``; the run's summary.

    ``run_id`` names this attempt (the Prefect flow-run id; default: a local one), ``run_name`` is
    recorded with it. A row is pending when the writer holds no answer to it under the same prompt.
    """
    started = time.perf_counter()
    t = run_steps
    run_key = params.run_key()
    run_id = run_id or local_run_id(run_key)
    extracted = t.extract(params)
    holder = runlock.holder_info(run_id, run_name, store.utcnow())
    with contextlib.ExitStack() as held:
        held.enter_context(writer.hold(run_key, holder))   # before the model loads: a second attempt fails at once
        shape = t.model_shape(params.model, params.policy)
        prompts = t.prompt(params, extracted, shape)
        for w in prompts.warnings:
            t.log().warning(w)
        budget = steps.budget(params, writer.budget_name(run_id))
        workload = steps.workload(prompts, getattr(shape, "tokenizer", None))
        llm = None
        try:
            if writer.loads_model_first or params.precision_left_to_search():
                llm = t.load_model(params.model, params.policy, budget.caps, workload)
                if params.precision_left_to_search():     # the search chose a precision: the key names it
                    run_key = params.run_key(llms.precision(llm))
                    held.enter_context(writer.hold(run_key, holder))   # and a run naming it excludes this one
            ctx = steps.RunContext.of(params, run_key, run_id, extracted.spec)
            engine = llms.engine_report(llm)
            record = run_record(params, ctx, holder, len(prompts.items), run_name,
                                policy=engine.get("policy", ctx.policy), budget=llms.policy_json(budget.caps))
            begun = t.start(writer, ctx, record, prompts.items, prompts.key_columns, extracted.present)
            mine = writer.share(prompts.items)
            todo = steps.pending(mine, begun.answered)
            if llm is None and len(todo):
                llm = t.load_model(params.model, params.policy, budget.caps, workload)
            tally = Tally(items=len(mine), skipped=len(mine) - len(todo),
                          replaced=resume.replaced(todo, begun.answered), stale=begun.stale_rows)
            return _answer(params, writer, ctx, prompts, todo, llm, tally, started, t)
        finally:
            budget.release(llm)


def _answer(params: WrangleParams, writer: Writer, ctx: steps.RunContext, prompts: steps.Prompts, todo: Any,
            llm: Any, tally: Tally, started: float, t: RunSteps) -> dict[str, Any]:
    """The run from its start on: every pending chunk answered, checked and written, then finished."""
    keys = prompts.key_columns
    t.log().info("run %s: %d item(s), %d already answered, %d to do (%d whose prompt changed); %d stored row(s) "
                 "no longer in the input", ctx.run_key, tally.items, tally.skipped, len(todo), tally.replaced,
                 tally.stale)
    try:
        chunks = steps.chunks(todo, params.chunk_size)
        for n, chunk in enumerate(chunks, 1):
            inference = t.infer(llm, chunk["prompt"].tolist(), prompts.max_new_tokens, params.batch_size,
                                params.chat)
            answers = t.parse(ctx.task, inference.raw)
            preds = steps.predictions(chunk, inference.raw, answers, ctx.task)
            check = t.validate(ctx.task, preds, keys, len(chunk))
            inserted = t.write(writer, ctx, steps.result_rows(ctx, preds, keys, check),
                               steps.quarantine_rows(ctx, preds, keys, check))
            tally.add(inserted, inference)
            t.log().info("chunk %d/%d: %d row(s) written, %d quarantined", n, len(chunks), inserted,
                         len(check.failed_rows))
        summary = t.finish(writer, ctx, prompts.items, keys)
        if summary["table_failures"]:
            raise RuntimeError("output check failed: " + "; ".join(summary["table_failures"]))
    except BaseException as exc:
        writer.fail(ctx, exc, started, skipped_rows=tally.skipped, **llms.measured(llms.engine_report(llm)))
        raise
    written = summary["written_rows"]
    result = {
        "run_id": ctx.run_id, "run_key": ctx.run_key, "task": ctx.task, "status": "completed",
        "input_rows": len(prompts.items), "skipped_rows": tally.skipped, "written_rows": written,
        "replaced_rows": tally.replaced, "stale_rows": tally.stale,
        "valid_rows": summary["valid_rows"], "quarantined_rows": summary["quarantined_rows"],
        "rows_per_s": written / tally.infer_s if tally.infer_s > 0 else None,
        "tokens_per_s": tally.tokens / tally.infer_s if tally.tokens and tally.infer_s > 0 else None,
        "seconds": time.perf_counter() - started, "metrics": summary["metrics"],
    }
    done = writer.complete(ctx, result, tally, llms.engine_report(llm))
    t.log().info("run %s completed: %d written, %d valid, %d quarantined, metrics %s", ctx.run_key, written,
                 result["valid_rows"], result["quarantined_rows"], result["metrics"])
    return done
