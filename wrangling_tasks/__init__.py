"""Data-wrangling tasks as prompts: entity matching, imputation, error detection.

Plain Python (no Prefect). The method follows "Can Foundation Models Wrangle Your
Data?" (Narayan et al., VLDB 2023): serialise rows as ``col: value. col: value``,
ask the paper's question, prepend ``k`` demonstrations (one shared prefix for all
rows), decode greedily with a newline stop, parse and score.

Public API::

    from wrangling_tasks import run, load_benchmark, get_task, TaskSpec

    inputs = load_benchmark("entity-matching", "Beer", "test")   # MatchingInputs
    result = run("entity-matching", inputs, llm, k=3, limit=20)  # RunResult
    result.predictions   # one row per item, input order: keys, prompt, prompt_hash,
                         # raw_output, answer, label, n_demos, truncated
    result.metrics       # precision/recall/f1/accuracy + tp/fp/fn/tn/unanswered, or None

    prepared = prepare("entity-matching", inputs, llm, k=3)     # prompts only, no inference

Input shapes (pandas DataFrames wrapped in a small dataclass per task):

* ``MatchingInputs(pairs, left=None, right=None, demos=None)``: either Magellan
  layout (``pairs`` has ``ltable_id, rtable_id[, label]`` over ``left``/``right``
  tables keyed by ``id``) or one pairs table with ``left_<attr>``/``right_<attr>``
  columns (``[, label]``). ``demos``: labelled pairs for few-shot, same layouts.
* ``ImputationInputs(table, target, labels=None, demos=None)``: rows whose
  ``target`` is null are imputed; rows where it is known (and ``demos``) are the
  demonstration pool; ``labels`` (aligned to ``table.index``) are the truth.
* ``DetectionInputs(table, columns=None, cells=None, labels=None, clean=None)``:
  each checked cell is one item keyed by ``(row_id, col_name)``; truth from
  ``labels`` (``row_id, col_name, is_error`` or ``is_clean``) or a ``clean`` twin.

A plain DataFrame is accepted too (``left_/right_`` pairs, an imputation table
with ``spec.target`` set, or a table to check).

The ``llm`` needs ``generate_text(prompts, max_new_tokens, stop="\\n",
do_sample=False) -> list[str]``; optionally ``score_choices(prompts, choices)``,
``tokenizer`` and ``max_context`` (used to fit prompts in the context window).
"""

from wrangling_tasks.base import Expectations, InputError, Prepared, RunResult, Task, TaskSpec
from wrangling_tasks.datasets import DATA, DatasetInfo, load_benchmark
from wrangling_tasks.entity_matching import MatchingInputs
from wrangling_tasks.error_detection import DetectionInputs
from wrangling_tasks.imputation import ImputationInputs, holdout
from wrangling_tasks.runner import prepare, run
from wrangling_tasks.registry import TASKS, get_task

__all__ = [
    "DATA",
    "DatasetInfo",
    "DetectionInputs",
    "Expectations",
    "ImputationInputs",
    "InputError",
    "MatchingInputs",
    "Prepared",
    "RunResult",
    "TASKS",
    "Task",
    "TaskSpec",
    "get_task",
    "holdout",
    "load_benchmark",
    "prepare",
    "run",
]
