"""Task names -> task modules."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from wrangling_tasks import entity_matching, error_detection, imputation
from wrangling_tasks.base import InputError

TASKS: dict[str, ModuleType] = {
    entity_matching.NAME: entity_matching,
    imputation.NAME: imputation,
    error_detection.NAME: error_detection,
}

_ALIASES = {
    "em": entity_matching.NAME,
    "matching": entity_matching.NAME,
    "di": imputation.NAME,
    "data-imputation": imputation.NAME,
    "ed": error_detection.NAME,
    "error-detection-spelling": error_detection.NAME,
}


def get_task(name: str | ModuleType | Any) -> Any:
    """The task module for ``name`` ("entity-matching", "imputation", "error-detection";
    underscores and short aliases em/di/ed work too). A task module passes through."""
    if not isinstance(name, str):
        if all(hasattr(name, a) for a in ("make_items", "parse", "score")):
            return name
        raise InputError(f"not a task: {name!r}; use one of {sorted(TASKS)}.")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise InputError(f"unknown task {name!r}; use one of {sorted(TASKS)}.")
    return TASKS[key]
