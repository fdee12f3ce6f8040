"""The ``wrangle`` flow: answer every row of a DuckDB table with a language model.

    extract -> prompt -> load model -> [per chunk: infer -> parse -> validate -> load] -> finish

Prompts are built with the model's tokenizer before its weights are placed, so that an automatic
policy (``policy="auto"``) is searched for this run's prompt lengths inside the engine's budget
(``gpu_mem``, ``cpu_mem``, ``disk_mem``, ``offload_dir``); the run record keeps the placed policy
and the measured peaks.

Each Prefect task below is a decorator around a plain function in :mod:`flows.steps`.
Results are written chunk by chunk (one transaction each) under a deterministic ``run_key``,
so a run killed midway and started again with the same parameters skips what it wrote (and
answers again the rows whose prompt changed). One attempt of a run is live at a time: a second
one fails at once, naming the live one (:mod:`flows.runlock`).
Run ``prefect deployment run wrangle/entity-matching`` against ``make serve``, or call
``wrangle(...)`` directly; see docs/flows.md.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import prefect
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import llms, resume, runlock, steps, store
from flows.params import WrangleParams
from wrangling_tasks import tables

TaskName = Literal["entity-matching", "imputation", "error-detection"]


@prefect.task(name="extract", cache_policy=NO_CACHE)
def extract(params: WrangleParams) -> steps.Extracted:
    """Read the input tables from DuckDB (read-only) and check them."""
    return steps.extract(params)


@prefect.task(name="model-shape", cache_policy=NO_CACHE)
def model_shape(model: str, policy: dict[str, Any] | str | None) -> Any:
    """The model's tokenizer and context size (no weights yet), to build prompts with."""
    return llms.model_shape(model, policy)


@prefect.task(name="load-model", cache_policy=NO_CACHE)
def load_model(model: str, policy: dict[str, Any] | str | None, budget: dict[str, Any] | None = None,
               workload: tuple[int, int] | None = None) -> Any:
    """Load the model once for the whole flow run, placed for its workload inside the budget."""
    llm = llms.load_llm(model, policy, budget, workload)
    report = llms.engine_report(llm)
    if report:
        get_run_logger().info("engine policy for workload %s within %s: %s", workload, budget, report["policy"])
    return llm


@prefect.task(name="prompt", cache_policy=NO_CACHE)
def prompt(params: WrangleParams, extracted: steps.Extracted, llm: Any) -> steps.Prompts:
    """Build every prompt (one shared few-shot prefix)."""
    return steps.build_prompts(params, extracted, llm)


@prefect.task(name="start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_run(database: str, record: dict[str, Any], ctx: steps.RunContext, items: Any, keys: tuple[str, ...],
              present: Any) -> steps.Started:
    """Create the output tables if needed, record the run, mark rows gone from the input stale,
    return the rows already answered."""
    return steps.start(database, record, ctx, items, keys, present)


@prefect.task(name="infer", cache_policy=NO_CACHE)
def infer(llm: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
          chat: bool) -> steps.Inference:
    """Generate answers for one chunk of prompts."""
    return steps.infer(llm, prompts, max_new_tokens, batch_size, chat)


@prefect.task(name="parse", cache_policy=NO_CACHE)
def parse(task_name: str, raw: list[str]) -> list[Any]:
    """Model text -> typed answers."""
    return steps.parse(task_name, raw)


@prefect.task(name="validate", cache_policy=NO_CACHE)
def validate(task_name: str, preds: Any, keys: tuple[str, ...], expected_rows: int) -> Any:
    """Great Expectations over one chunk's outputs."""
    return steps.validate(task_name, preds, keys, expected_rows)


@prefect.task(name="load", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def load(database: str, ctx: steps.RunContext, results: Any, quarantine: Any) -> int:
    """Write one chunk in one transaction (idempotent: safe to retry); the rows inserted."""
    return steps.load(database, ctx, results, quarantine)


@prefect.task(name="finish", cache_policy=NO_CACHE)
def finish(database: str, ctx: steps.RunContext, items: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Validate the whole run's output, quarantine failures, score it."""
    return steps.check_whole_run(database, ctx, items, keys)


@flow(name="wrangle", flow_run_name="wrangle-{task}-{table}")
def wrangle(
    task: TaskName,
    table: str,
    left_table: str | None = None,
    right_table: str | None = None,
    demos_table: str | None = None,
    labels_table: str | None = None,
    cells_table: str | None = None,
    clean_table: str | None = None,
    target: str | None = None,
    columns: list[str] | None = None,
    spec: str | dict[str, Any] | None = None,
    database: str = "data/wrangle.duckdb",
    model: str = "qwen2.5-coder-1.5b",
    policy: dict[str, Any] | Literal["auto"] | None = None,
    gpu_mem: str | int | None = None,
    cpu_mem: str | int | None = None,
    disk_mem: str | int | None = None,
    offload_dir: str | None = None,
    k: int = 0,
    seed: int = 0,
    chat: bool = False,
    limit: int | None = None,
    batch_size: int = 64,
    chunk_size: int = 256,
    tag: str = "",
) -> dict[str, Any]:
    """Answer every row of ``table`` for ``task`` and write validated results to DuckDB.

    Tables per task -- entity-matching: ``table`` = candidate pairs (``ltable_id, rtable_id``
    over ``left_table``/``right_table``, or ``left_<attr>``/``right_<attr>`` columns),
    ``demos_table`` = labelled pairs for few-shot. imputation: ``table`` with a ``target``
    column to fill where null, ``labels_table`` (``row_id, <target>``) for scoring,
    ``demos_table`` extra labelled rows. error-detection: ``table`` (its ``columns`` or all
    attribute cells), ``cells_table`` (``row_id, col_name``) to check only some cells,
    ``labels_table`` (``row_id, col_name, is_error|is_clean``) or ``clean_table`` for truth.

    ``spec``: a benchmark dataset name (e.g. "Beer") or a dict of TaskSpec fields. ``model``:
    an engine model name/path, or ``"constant:<answer>"`` (a baseline). ``policy``: Policy
    fields, or "auto" to search one for this run's prompts inside the budget (``{"auto": true,
    "int8_matmul": true}`` and the like: at that precision). ``gpu_mem``/``cpu_mem``/``disk_mem``:
    the engine's caps per tier ("2GB"); ``offload_dir``: where its disk tier lives (default: a
    folder next to the database, removed after the run). ``chat``: wrap prompts in the model's chat template (helps a small
    instruct model at k = 0). ``limit``: first N items only. ``chunk_size``: rows per committed
    chunk. ``tag``: any text; a different tag starts a fresh run instead of resuming.
    """
    log = get_run_logger()
    started = time.perf_counter()
    params = WrangleParams(
        task=task, table=table, left_table=left_table, right_table=right_table,
        demos_table=demos_table, labels_table=labels_table, cells_table=cells_table,
        clean_table=clean_table, target=target, columns=tuple(columns) if columns else None,
        spec=spec, database=database, model=model, policy=policy, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
        disk_mem=disk_mem, offload_dir=offload_dir, k=k, seed=seed, chat=chat,
        limit=limit, batch_size=batch_size, chunk_size=chunk_size, tag=tag,
    )
    run_key = params.run_key()
    run_id = str(flow_run.id) if flow_run.id else f"local-{run_key}-{time.time_ns()}"

    # Everything that can fail on the caller's input happens before the first write.
    extracted = extract(params)
    holder = runlock.holder_info(run_id, flow_run.name, store.utcnow())
    with contextlib.ExitStack() as held:
        # before the model loads, so that a second attempt fails at once
        held.enter_context(runlock.hold(database, run_key, holder))
        shape = model_shape(model, policy)
        prompts = prompt(params, extracted, shape)
        for w in prompts.warnings:
            log.warning(w)
        budget = steps.budget(params, run_id)
        llm = None
        try:
            llm = load_model(model, policy, budget.caps, steps.workload(prompts, getattr(shape, "tokenizer", None)))
            if params.precision_left_to_search():     # the search chose a precision: the key names it
                run_key = params.run_key(llms.precision(llm))
                held.enter_context(runlock.hold(database, run_key, holder))   # and a run naming it excludes this one
            return _answer(params, run_key, run_id, extracted, prompts, llm, budget, started, holder)
        finally:
            budget.release(llm)


def _answer(params: WrangleParams, run_key: str, run_id: str, extracted: steps.Extracted,
            prompts: steps.Prompts, llm: Any, budget: steps.Budget, started: float,
            holder: dict[str, Any]) -> dict[str, Any]:
    """The run from its record on: every pending chunk answered, checked and written."""
    log = get_run_logger()
    task, database = params.task, params.database
    ctx = steps.RunContext(task=task, run_key=run_key, run_id=run_id, model=params.model,
                           policy=llms.policy_json(params.policy), spec=extracted.spec)
    items = prompts.items
    engine = llms.engine_report(llm)
    begun = start_run(database, {
        "run_id": run_id, "run_key": run_key, "flow_run_name": flow_run.name, "task": task,
        "parameters": llms.policy_json(params.identity() | {"limit": params.limit, "database": database}),
        "model": params.model, "policy": engine.get("policy", ctx.policy), "input_rows": len(items),
        "budget": llms.policy_json(budget.caps), "host": holder["host"], "pid": holder["pid"],
    }, ctx, items, prompts.key_columns, extracted.present)
    todo = steps.pending(items, begun.answered)
    replaced = resume.replaced(todo, begun.answered)
    log.info("run %s: %d item(s), %d already answered, %d to do (%d whose prompt changed); %d stored row(s) no "
             "longer in the input", run_key, len(items), len(items) - len(todo), len(todo), replaced, begun.stale_rows)

    infer_s, tokens = 0.0, 0
    try:
        parts = steps.chunks(todo, params.chunk_size)
        for n, chunk in enumerate(parts, 1):
            inference = infer(llm, chunk["prompt"].tolist(), prompts.max_new_tokens, params.batch_size, params.chat)
            answers = parse(task, inference.raw)
            preds = steps.predictions(chunk, inference.raw, answers, task)
            check = validate(task, preds, prompts.key_columns, len(chunk))
            inserted = load(database, ctx, steps.result_rows(ctx, preds, prompts.key_columns, check),
                            steps.quarantine_rows(ctx, preds, prompts.key_columns, check))
            infer_s += inference.seconds
            tokens = None if inference.tokens is None or tokens is None else tokens + inference.tokens
            log.info("chunk %d/%d: %d row(s) written, %d quarantined", n, len(parts), inserted,
                     len(check.failed_rows))
        summary = finish(database, ctx, items, prompts.key_columns)
        if summary["table_failures"]:
            raise RuntimeError("output check failed: " + "; ".join(summary["table_failures"]))
    except BaseException as exc:
        _record_failure(database, ctx, exc, started, len(items) - len(todo), llms.engine_report(llm))
        raise

    seconds = time.perf_counter() - started
    written = summary["written_rows"]
    result = {
        "run_id": run_id, "run_key": run_key, "task": task, "status": "completed",
        "input_rows": len(items), "skipped_rows": len(items) - len(todo), "written_rows": written,
        "replaced_rows": replaced, "stale_rows": begun.stale_rows,
        "valid_rows": summary["valid_rows"], "quarantined_rows": summary["quarantined_rows"],
        "rows_per_s": written / infer_s if infer_s > 0 else None,
        "tokens_per_s": tokens / infer_s if tokens and infer_s > 0 else None,
        "seconds": seconds, "metrics": summary["metrics"],
    }
    engine = llms.engine_report(llm)
    with tables.connect(database) as con:
        store.finish_run(con, run_id, finished_at=store.utcnow(),
                         **{k: v for k, v in result.items() if k not in ("run_id", "run_key", "task")},
                         **{k: v for k, v in engine.items() if k != "policy"})
    result |= engine
    log.info("run %s completed: %d valid, %d quarantined, metrics %s", run_key,
             result["valid_rows"], result["quarantined_rows"], result["metrics"])
    return result


def _record_failure(database: str, ctx: steps.RunContext, exc: BaseException, started: float,
                    skipped: int, engine: dict[str, Any]) -> None:
    status = "failed" if isinstance(exc, Exception) else "cancelled"
    try:
        with tables.connect(database, lock_timeout_s=5) as con:
            store.finish_run(con, ctx.run_id, status=status, error=f"{type(exc).__name__}: {exc}",
                             finished_at=store.utcnow(), seconds=time.perf_counter() - started,
                             written_rows=store.written_by(con, ctx.task, ctx.run_key, ctx.run_id),
                             skipped_rows=skipped, **{k: v for k, v in engine.items() if k != "policy"})
    except Exception as record_exc:  # the original error matters more; keep it
        get_run_logger().warning("could not record the failure of run %s: %s", ctx.run_id, record_exc)


if __name__ == "__main__":  # python flows/wrangle.py: the Beer benchmark with defaults
    print(wrangle(task="entity-matching", table="beer_test_pairs", left_table="beer_table_a",
                  right_table="beer_table_b", demos_table="beer_train_pairs", spec="Beer"))
