"""The ``wrangle`` flow's parameters, checked, and the run key they define (plain Python)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import wrangling_tasks as wt
from wrangling_tasks import tables
from wrangling_tasks.base import InputError, TaskSpec

from flows.llms import policy_json

TASK_NAMES = tuple(wt.TASKS)
BUDGET_FIELDS = ("gpu_mem", "cpu_mem", "disk_mem", "offload_dir")    # the engine's caps and disk folder
RUN_KEY_VERSION = 1

# Which table parameters each task reads (any other given table parameter is an error).
TASK_TABLES: dict[str, tuple[str, ...]] = {name: mod.TABLES for name, mod in wt.TASKS.items()}
TABLE_PARAMS = ("table", "left_table", "right_table", "demos_table", "labels_table",
                "cells_table", "clean_table")
OPTION_PARAMS = ("target", "columns")   # parameters only some tasks take (each task's OPTIONS)


@dataclass(frozen=True)
class WrangleParams:
    """The flow's parameters, checked. ``run_key()`` hashes the ones that change answers."""

    task: str
    table: str
    left_table: str | None = None
    right_table: str | None = None
    demos_table: str | None = None
    labels_table: str | None = None
    cells_table: str | None = None
    clean_table: str | None = None
    target: str | None = None
    columns: tuple[str, ...] | None = None
    spec: str | Mapping[str, Any] | None = None
    database: str = "data/wrangle.duckdb"
    model: str = "qwen2.5-coder-1.5b"
    policy: Mapping[str, Any] | str | None = None
    gpu_mem: str | int | None = None
    cpu_mem: str | int | None = None
    disk_mem: str | int | None = None
    offload_dir: str | None = None
    k: int = 0
    seed: int = 0
    chat: bool = False
    limit: int | None = None
    batch_size: int = 64
    chunk_size: int = 256
    tag: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise InputError(f"unknown task {self.task!r}; use one of {list(TASK_NAMES)}")
        if not self.table:
            raise InputError("the `table` parameter is required (the pairs table for entity matching)")
        used = TASK_TABLES[self.task]
        extra = [p for p in TABLE_PARAMS if p not in used and getattr(self, p)]
        if extra:
            raise InputError(f"{self.task} does not use parameter(s) {extra}; it reads {list(used)}")
        for p in used:
            if getattr(self, p) is not None:
                tables.quote_ident(getattr(self, p))  # empty / NUL names fail here
        mod = wt.get_task(self.task)
        for name, what in mod.REQUIRED_OPTIONS.items():
            if not (getattr(self, name) or _spec_field(self.spec, name)):
                raise InputError(f"{self.task} needs `{name}` ({what})")
        for name in OPTION_PARAMS:
            if getattr(self, name) and name not in mod.OPTIONS:
                takers = " / ".join(n.replace("-", " ") for n, m in wt.TASKS.items() if name in m.OPTIONS)
                raise InputError(f"`{name}` is for {takers}, not {self.task}")
        if self.k < 0:
            raise InputError(f"k must be >= 0, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1 or None, got {self.limit}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise InputError("batch_size and chunk_size must be >= 1")
        if isinstance(self.policy, str) and self.policy != "auto":
            raise InputError(f'policy must be a dict of Policy fields, "auto" or None, got {self.policy!r}')
        if isinstance(self.policy, Mapping) and self.policy.get("auto"):
            from engine.generate import PRECISION_FIELDS   # the precision an automatic policy keeps

            extra = set(self.policy) - {"auto", *PRECISION_FIELDS}
            if extra:
                raise InputError(f"an automatic policy takes only {['auto', *PRECISION_FIELDS]} (the precision "
                                 f"it keeps), not {sorted(extra)}: the search chooses placement and batch itself")
        for name in BUDGET_FIELDS[:3]:
            if getattr(self, name) is not None:
                _check_size(name, getattr(self, name))

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "WrangleParams":
        """From a flow's keyword arguments (its ``locals()`` on entry; other names are ignored), with
        ``columns`` as a tuple: flows take a list, which JSON parameters can carry."""
        fields = {f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
        if "columns" in fields:
            fields["columns"] = tuple(fields["columns"]) if fields["columns"] else None
        return cls(**fields)

    def identity(self) -> dict[str, Any]:
        """Everything that can change an answer (not: database, limit, batch and chunk sizes, the
        engine's memory budget: a placement never changes the tokens, and precision is in `policy`)."""
        d = asdict(self)
        for k in ("database", "limit", "batch_size", "chunk_size", *BUDGET_FIELDS):
            d.pop(k)
        d["columns"] = list(self.columns) if self.columns else None
        d["policy"] = json.loads(policy_json(self.policy))
        d["spec"] = json.loads(json.dumps(self.spec, sort_keys=True, default=str))
        d["version"] = RUN_KEY_VERSION
        return d

    def precision_left_to_search(self) -> bool:
        """Whether an automatic policy lets the search choose a precision ({"auto": true,
        "compress_weight": null}): the run key must then name the one it chose."""
        return isinstance(self.policy, Mapping) and bool(self.policy.get("auto")) and any(
            k != "auto" and v is None for k, v in self.policy.items())

    def run_key(self, precision: Mapping[str, Any] | None = None) -> str:
        """Deterministic name of the logical run: same parameters, same key (resume). ``precision``:
        what the search chose where the policy left it open (see precision_left_to_search)."""
        identity = self.identity() | ({"precision": dict(precision)} if precision else {})
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _check_size(name: str, value: Any) -> None:
    from engine.tiers import parse_bytes   # the engine's own grammar: what it will be given

    try:
        ok = not isinstance(value, bool) and parse_bytes(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{name}={value!r} is not a size: write e.g. '2GB', '512MB' or a number of bytes")


def _spec_field(spec: str | Mapping[str, Any] | None, name: str) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name)
    if isinstance(spec, str) and spec in wt.DATA:
        return getattr(wt.DATA[spec].spec, name)
    return None


def resolve_spec(params: WrangleParams) -> TaskSpec:
    """The TaskSpec: a benchmark dataset's (by name), fields given as a dict, or defaults."""
    mod = wt.get_task(params.task)
    spec = params.spec
    if spec is None:
        out = mod.default_spec()
    elif isinstance(spec, str):
        info = wt.DATA.get(spec)
        if info is None:
            raise InputError(f"unknown dataset spec {spec!r}; known: {sorted(wt.DATA)}")
        if info.task != mod.NAME:
            raise InputError(f"spec {spec!r} is for {info.task}, not {mod.NAME}")
        out = info.spec
    else:
        fields = dict(spec)
        for name in ("drop_columns", "id_columns", "columns"):
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        try:
            out = TaskSpec(**fields)
        except TypeError as exc:
            raise InputError(f"invalid spec {fields!r}: {exc}") from exc
    if params.target:
        out = out.replace(target=params.target)
    if params.columns:
        out = out.replace(columns=tuple(params.columns))
    return out
