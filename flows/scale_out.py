"""The ``wrangle`` flow spread over many workers: ``wrangle-scale-out`` splits the input rows into
partitions and runs each as a ``wrangle-partition`` flow run on the work pool, so N workers (on N
machines) each answer a share with their own engine; then it merges their outputs into DuckDB.

    extract (read-only) -> start run -> [partition i of N: extract -> load model -> prompt ->
    own share -> per chunk: infer -> parse -> validate -> Parquet] x N -> merge (one transaction)
    -> finish (whole-run check, metrics, run record)

A row belongs to partition ``crc32(row identity) % N`` (flows.partitions). Partitions never write
DuckDB (one writer per file): they write Parquet files typed like the output tables, and the
parent loads them all in one transaction, skipping rows already present, so every row is written
once by its key. The run key is the ``wrangle`` flow's: a scaled-out run resumes a plain one and
the other way round; rows answered under the same prompt by an earlier attempt (merged or still in
Parquet) are skipped, rows whose prompt changed are answered again. The parent holds the run's
lock (flows.runlock) for the whole attempt, partitions included.

Deploy ``wrangle_partition`` on the pool the workers serve (see docs/distributed.md) and start the
parent with ``deployment="wrangle-partition/<name>"``; ``deployment=None`` runs the partitions
one after another in this process (subflows), which needs no worker.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Literal

import prefect
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import runlock, steps, store
from flows import partitions as parts
from flows.params import WrangleParams
from flows.runner import local_run_id, run_record, run_wrangle
from flows.wrangle import STEPS, TaskName, extract, finish, flow_run_id, prompt, start_run
from flows.writers import DuckDBWriter, ParquetWriter, Writer

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@prefect.task(name="write-parquet", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_parquet(writer: Writer, ctx: steps.RunContext, results: Any, quarantine: Any) -> int:
    """One chunk of a partition as Parquet files (whole files only: safe to retry)."""
    return writer.write(ctx, results, quarantine)


@prefect.task(name="merge", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def merge(database: str, task: str, output_dir: str, run_key: str) -> dict[str, int]:
    """Every partition's Parquet files into DuckDB in one transaction (idempotent by key)."""
    return parts.merge(database, task, output_dir, run_key)


@flow(name="wrangle-partition", flow_run_name="wrangle-partition-{partition}-of-{partitions}")
def wrangle_partition(params: dict[str, Any], partition: int, partitions: int, run_key: str,
                      run_id: str, output_dir: str = "data/partitions") -> dict[str, Any]:
    """Answer partition ``partition`` of ``partitions`` of a wrangle run into Parquet files.

    ``params`` are the ``wrangle`` flow's parameters; ``run_key`` must be the one they give here
    (the parent's), or the worker has other code or data than the parent and the run stops. This
    worker's prompts are the exact ones (fitted to its model's context): it decides what is left to do.
    """
    p = WrangleParams.from_arguments(params)
    if p.run_key() != run_key:
        raise RuntimeError(f"run key {p.run_key()} here but {run_key} in the parent: this worker has "
                           "other code or input tables than the parent")
    writer = ParquetWriter(p.database, output_dir, partition, partitions, flow_run_id=flow_run_id())
    return run_wrangle(p, writer, run_id=run_id, run_name=flow_run.name,
                       run_steps=dataclasses.replace(STEPS, write=write_parquet))


@flow(name="wrangle-scale-out", flow_run_name="wrangle-scale-out-{task}-{table}")
def wrangle_scale_out(
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
    partitions: int = 2,
    deployment: str | None = "wrangle-partition/partition",
    output_dir: str = "data/partitions",
    poll_seconds: float = 2.0,
) -> dict[str, Any]:
    """The ``wrangle`` flow (same parameters, same outputs and run key) over ``partitions``
    flow runs of ``deployment`` (``None``: subflows in this process). Each partition places its own
    engine within the same budget (``gpu_mem``, ``cpu_mem``, ``disk_mem``: per worker).

    ``database`` and ``output_dir`` must name the same storage on every worker (a shared mount
    when workers are on several machines); the parent alone writes ``database``.
    """
    started = time.perf_counter()
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    params = WrangleParams.from_arguments(locals())
    if params.precision_left_to_search():
        raise ValueError("a scaled-out run cannot leave the precision to the policy search (each worker would "
                         "choose its own): name it in the policy, e.g. {\"auto\": true, \"compress_weight\": true}")
    run_key = params.run_key()
    # Before the first write: the inputs, the rows (identities only: no model here), the deployment.
    extracted = extract(params)
    run_id = flow_run_id() or local_run_id(run_key)
    holder = runlock.holder_info(run_id, flow_run.name, store.utcnow())
    writer = DuckDBWriter(database, get_run_logger())
    with writer.hold(run_key, holder):      # the partitions belong to this attempt
        items = prompt(params, extracted, None)
        if deployment is not None:
            _check_deployment(deployment)
        ctx = steps.RunContext.of(params, run_key, run_id, extracted.spec)
        return _scale_out(params, writer, ctx, holder, extracted, items, partitions, deployment,
                          os.path.abspath(output_dir), poll_seconds, started)


def _scale_out(params: WrangleParams, writer: DuckDBWriter, ctx: steps.RunContext, holder: dict[str, Any],
               extracted: steps.Extracted, items: steps.Prompts, partitions: int, deployment: str | None,
               output_dir: str, poll_seconds: float, started: float) -> dict[str, Any]:
    """The scaled-out run from its record on, under the run's lock."""
    log = get_run_logger()
    task, database, run_key, run_id = params.task, params.database, ctx.run_key, ctx.run_id
    begun = start_run(writer, ctx, run_record(params, ctx, holder, len(items.items), flow_run.name,
                                              {"partitions": partitions}),
                      items.items, items.key_columns, extracted.present)
    # The parent's prompts are built without the model; where the model's context window makes a worker fit
    # them otherwise, a partition may be started that finds nothing to do (it then loads no model).
    fresh = steps.pending(items.items, begun.answered)                 # not in DuckDB under this prompt
    todo = steps.pending(fresh, parts.written_keys(output_dir, run_key))  # nor in unmerged files
    shares = [len(parts.share(todo, i, partitions)) for i in range(partitions)]
    log.info("run %s: %d item(s), %d to do, shares %s; %d stored row(s) no longer in the input", run_key,
             len(items.items), len(todo), shares, begun.stale_rows)

    parts.clear_manifests(output_dir, run_key)
    # paths as this process sees them: a worker resolves relative paths in its own directory
    child = {**dataclasses.asdict(params), "columns": list(params.columns) if params.columns else None,
             "database": os.path.abspath(database)}
    failed: list[str] = []
    phase = time.perf_counter()
    try:
        launch = [i for i, n in enumerate(shares) if n]
        if deployment is None:
            for i in launch:
                wrangle_partition(child, i, partitions, run_key, run_id, output_dir)
        else:
            failed = _run_partitions(deployment, launch, child, partitions, run_key, run_id,
                                     output_dir, poll_seconds)
    except BaseException as exc:
        writer.fail(ctx, exc, started, written_rows=_salvage(database, task, output_dir, run_key, log))
        raise
    phase = time.perf_counter() - phase
    merged = merge(database, task, output_dir, run_key)        # what the partitions wrote, even if some failed
    if failed:
        exc = RuntimeError(f"partition run(s) did not complete: {'; '.join(failed)} (rows they wrote are "
                           "merged; run again with the same parameters to finish)")
        writer.fail(ctx, exc, started, written_rows=merged["results"])
        raise exc
    reports = parts.read_manifests(output_dir, run_key)
    summary = finish(writer, ctx, items.items, items.key_columns)
    if summary["table_failures"]:
        exc = RuntimeError("output check failed: " + "; ".join(summary["table_failures"]))
        writer.fail(ctx, exc, started, written_rows=merged["results"])
        raise exc
    tokens = [r.get("tokens") for r in reports]
    written = merged["results"]
    result = {
        "run_id": run_id, "run_key": run_key, "task": task, "status": "completed",
        "input_rows": len(items.items), "skipped_rows": len(items.items) - len(fresh), "written_rows": written,
        "replaced_rows": merged["replaced"], "stale_rows": begun.stale_rows,
        "valid_rows": summary["valid_rows"], "quarantined_rows": summary["quarantined_rows"],
        "rows_per_s": written / phase if written and phase > 0 else None,
        "tokens_per_s": sum(tokens) / phase if tokens and None not in tokens and phase > 0 else None,
        "seconds": time.perf_counter() - started, "metrics": summary["metrics"],
    }
    writer.complete(ctx, result)
    parts.clear_manifests(output_dir, run_key)
    log.info("run %s completed over %d partition(s): %d written, %d valid, metrics %s", run_key,
             partitions, written, result["valid_rows"], result["metrics"])
    return result | {"partitions": reports, "shares": shares}


def _run_partitions(deployment: str, launch: list[int], child: dict, n: int, run_key: str, run_id: str,
                    output_dir: str, poll_seconds: float) -> list[str]:
    """Start one flow run per partition on the pool (all at once), wait for all; the failures."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runs = {}
    for i in launch:
        runs[i] = run_deployment(
            deployment, timeout=0, flow_run_name=f"wrangle-partition-{i}-of-{n}-{run_key[:8]}",
            parameters={"params": child, "partition": i, "partitions": n, "run_key": run_key,
                        "run_id": run_id, "output_dir": output_dir})
    failed = []
    with get_client(sync_client=True) as client:
        pending = dict(runs)
        while pending:
            time.sleep(poll_seconds)
            for i, run in list(pending.items()):
                state = client.read_flow_run(run.id).state
                if state is not None and state.type.value in FINAL:
                    pending.pop(i)
                    if state.type.value != "COMPLETED":
                        failed.append(f"partition {i} ({run.name}): {state.type.value} {state.message or ''}")
    return failed


def _check_deployment(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(f"deployment {name!r} not found: deploy flows/scale_out.py:wrangle_partition "
                             "on the workers' pool (docs/distributed.md), or pass deployment=None") from None


def _salvage(database: str, task: str, output_dir: str, run_key: str, log) -> int:
    """On an interruption, keep what the partitions finished (merged now, or left for the next run);
    the rows merged."""
    try:
        return parts.merge(database, task, output_dir, run_key)["results"]
    except Exception as exc:  # the files stay; the next run with the same parameters merges them
        log.warning("could not merge the partitions' files now (they are kept): %s", exc)
        return 0
