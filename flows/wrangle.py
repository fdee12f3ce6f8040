"""The ``wrangle`` flow: answer every row of a DuckDB table with a language model.

    extract -> prompt -> load model -> [per chunk: infer -> parse -> validate -> load] -> finish

The flow is a shell over :func:`flows.runner.run_wrangle` with a :class:`flows.writers.DuckDBWriter`;
each Prefect task below is a decorator around one of its steps, so the steps show as task runs and
the writes are retried. Prompts are built with the model's tokenizer before its weights are placed,
so that an automatic policy (``policy="auto"``) is searched for this run's prompt lengths inside the
engine's budget (``gpu_mem``, ``cpu_mem``, ``disk_mem``, ``offload_dir``); the run record keeps the
placed policy and the measured peaks.

Results are written chunk by chunk (one transaction each) under a deterministic ``run_key``,
so a run killed midway and started again with the same parameters skips what it wrote (and
answers again the rows whose prompt changed). One attempt of a run is live at a time: a second
one fails at once, naming the live one (:mod:`flows.runlock`).
Run ``prefect deployment run wrangle/entity-matching`` against ``make serve``, or call
``wrangle(...)`` directly; see docs/flows.md.
"""

from __future__ import annotations

from typing import Any, Literal

import prefect
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import llms, steps
from flows.params import TASK_NAMES, WrangleParams
from flows.runner import RunSteps, run_wrangle
from flows.writers import DuckDBWriter, Writer

TaskName = Literal[TASK_NAMES]


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
def start_run(writer: Writer, ctx: steps.RunContext, record: dict[str, Any], items: Any, keys: tuple[str, ...],
              present: Any) -> steps.Started:
    """Create the output tables if needed, record the run, mark rows gone from the input stale,
    return the rows already answered."""
    return writer.start(ctx, record, items, keys, present)


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
def load(writer: Writer, ctx: steps.RunContext, results: Any, quarantine: Any) -> int:
    """Write one chunk in one transaction (idempotent: safe to retry); the rows inserted."""
    return writer.write(ctx, results, quarantine)


@prefect.task(name="finish", cache_policy=NO_CACHE)
def finish(writer: Writer, ctx: steps.RunContext, items: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Validate the whole run's output, quarantine failures, score it."""
    return writer.finish(ctx, items, keys)


# The steps of a run as this module's Prefect tasks (the scale-out flows reuse them).
STEPS = RunSteps(extract=extract, model_shape=model_shape, prompt=prompt, load_model=load_model, start=start_run,
                 infer=infer, parse=parse, validate=validate, write=load, finish=finish, log=get_run_logger)


def flow_run_id() -> str | None:
    """The id of the Prefect flow run this code runs in, if any."""
    return str(flow_run.id) if flow_run.id else None


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
    params = WrangleParams.from_arguments(locals())
    return run_wrangle(params, DuckDBWriter(params.database, get_run_logger()), run_id=flow_run_id(),
                       run_name=flow_run.name, run_steps=STEPS)


if __name__ == "__main__":  # python flows/wrangle.py: the Beer benchmark with defaults
    print(wrangle(task="entity-matching", table="beer_test_pairs", left_table="beer_table_a",
                  right_table="beer_table_b", demos_table="beer_train_pairs", spec="Beer"))
