"""The benchmark datasets in ``data/``: one spec per dataset (data), and ``load_benchmark``.

Layout: ``data/<task dir>/<Dataset>/`` with the files of the origin format:
``magellan`` (tableA, tableB, train/valid/test pairs), ``ditto`` (train/valid/test.txt
serialised pairs), ``splits`` (imputation train/valid/test rows), ``cells``
(Hospital: table.csv + train/valid/test cell labels), ``raha`` (dirty.csv + clean.csv).
Counts are items per split, as documented in data/SOURCES.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from wrangling_tasks.base import InputError, TaskSpec, require_columns
from wrangling_tasks.entity_matching import MatchingInputs
from wrangling_tasks.error_detection import DetectionInputs, cell_labels_from_clean
from wrangling_tasks.imputation import ImputationInputs
from wrangling_tasks.registry import get_task
from wrangling_tasks.serialize import attribute_columns

DEFAULT_DATA_DIR = Path(os.environ.get("FLEXWRANGLE_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
TASK_DIRS = {"entity-matching": "entity_matching", "imputation": "imputation", "error-detection": "error_detection"}
SPLITS = ("train", "valid", "test")
RAHA_SPLIT = {"seed": 0, "train": 0.09, "valid": 0.01}  # cell shares; the rest is test (as in Hospital)


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark dataset: where it lives, how to read it, how to prompt it."""

    name: str
    task: str  # a TASKS key
    layout: str  # magellan | ditto | splits | cells | raha
    spec: TaskSpec
    counts: Mapping[str, int] = field(default_factory=dict)  # items per split
    note: str = ""


def _em(name: str, layout: str, counts: tuple[int, int, int], **spec: Any) -> DatasetInfo:
    return DatasetInfo(name, "entity-matching", layout, TaskSpec(name=name, max_new_tokens=3, **spec),
                       dict(zip(SPLITS, counts)))


# Column drops, renames and question suffixes follow fm_data_tasks (HazyResearch) constants.
DATA: dict[str, DatasetInfo] = {d.name: d for d in [
    _em("Fodors-Zagats", "magellan", (567, 190, 189), drop_columns=("class",)),  # `class` leaks the label
    _em("Beer", "magellan", (268, 91, 91), drop_columns=("Style", "ABV"),
        rename={"Beer_Name": "name", "Brew_Factory_Name": "factory"}),
    _em("iTunes-Amazon", "ditto", (321, 109, 109), entity="Song", question="Same Song?",
        drop_columns=("CopyRight",),
        rename={"Song_Name": "name", "Artist_Name": "artist name", "Album_Name": "album name",
                "Genre": "genre", "Price": "price", "Time": "time", "Released": "released"}),
    _em("Walmart-Amazon", "magellan", (6144, 2049, 2049), question="Are A and B the Same?",
        drop_columns=("category", "price", "brand")),
    _em("Amazon-Google", "magellan", (6874, 2293, 2293)),
    _em("DBLP-ACM", "magellan", (7417, 2473, 2473)),
    _em("Abt-Buy", "magellan", (5743, 1916, 1916)),  # not in the paper; default prompt
    DatasetInfo("Restaurant", "imputation", "splits",
                TaskSpec(name="Restaurant", target="city", question="What is the {target}?", max_new_tokens=5),
                {"train": 622, "valid": 156, "test": 86}),
    DatasetInfo("Buy", "imputation", "splits",
                TaskSpec(name="Buy", target="manufacturer", question="Who is the {target}?", max_new_tokens=10),
                {"train": 469, "valid": 117, "test": 65}),
    DatasetInfo("Hospital", "error-detection", "cells",
                TaskSpec(name="Hospital", question="Is there a x spelling error in {cell}?", max_new_tokens=3),
                {"train": 1710, "valid": 189, "test": 17101}),
    DatasetInfo("beers", "error-detection", "raha",
                TaskSpec(name="beers", question="Is there an error in {cell}?", max_new_tokens=3),
                {"train": 1952, "valid": 216, "test": 19522},
                note="not in the paper; errors are formats and wrong values, so the question is generic"),
]}


def load_benchmark(task: str, dataset: str, split: str = "test", data_dir: str | Path | None = None,
                   spec: TaskSpec | None = None) -> Any:
    """Read ``split`` of a benchmark dataset as task inputs (labels included, ``.spec`` set).

    Few-shot demonstrations come from the train split (from valid when ``split`` is
    "train"). ``data_dir`` is the data root (``<task dir>/<Dataset>/``) or a dataset
    folder itself; an unknown ``dataset`` name is read from ``data_dir`` by its
    files, with ``spec`` (or the task defaults).
    """
    mod = get_task(task)
    split = {"validation": "valid", "dev": "valid"}.get(split, split)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {list(SPLITS)}.")
    info = DATA.get(dataset)
    if info is None:
        known = [n for n, d in DATA.items() if d.task == mod.NAME]
        if data_dir is None:
            raise InputError(f"unknown {mod.NAME} dataset {dataset!r}; known: {known}. For your own files "
                             "pass data_dir (a folder in the same layout).")
        folder = _folder(mod.NAME, dataset, data_dir)
        info = DatasetInfo(dataset, mod.NAME, _guess_layout(folder), spec or TaskSpec(name=dataset))
    elif info.task != mod.NAME:
        raise InputError(f"{dataset} is a {info.task} dataset, not {mod.NAME}.")
    else:
        folder = _folder(mod.NAME, dataset, data_dir)
    spec = spec or info.spec
    demo_split = "valid" if split == "train" else "train"
    reader = {"magellan": _magellan, "ditto": _ditto, "splits": _splits, "cells": _cells, "raha": _raha}
    return reader[info.layout](folder, split, demo_split, spec)


def read_csv(path: Path) -> pd.DataFrame:
    """CSV as text: only empty fields are missing ("N/A", "nan" stay as written)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; see data/SOURCES.md for the expected files.")
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")


_DITTO_ATTR = re.compile(r"(?:^|\s)COL (\S+) VAL(?= |$)")


def parse_ditto_entity(text: str) -> dict[str, str | None]:
    """``"COL a VAL x COL b VAL y"`` -> ``{"a": "x", "b": "y"}`` (empty value -> None)."""
    marks = list(_DITTO_ATTR.finditer(text))
    out: dict[str, str | None] = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        value = text[m.end(): nxt.start() if nxt else len(text)].strip()
        out[m.group(1)] = value or None
    return out


def read_ditto(path: Path) -> pd.DataFrame:
    """Ditto pairs file -> ``left_<attr>``, ``right_<attr>``, ``label`` (one row per line)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; see data/SOURCES.md for the expected files.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise InputError(f"{path}:{n}: expected 'left<TAB>right<TAB>label', got {len(parts)} fields.")
        left, right = parse_ditto_entity(parts[0]), parse_ditto_entity(parts[1])
        row = {f"left_{k}": v for k, v in left.items()} | {f"right_{k}": v for k, v in right.items()}
        row["label"] = int(parts[2].strip())
        rows.append(row)
    return pd.DataFrame(rows)


# --- readers per layout ----------------------------------------------------------------------


def _folder(task: str, dataset: str, data_dir: str | Path | None) -> Path:
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    for cand in (root / TASK_DIRS[task] / dataset, root / dataset, root):
        if cand.is_dir() and (any(cand.glob("*.csv")) or any(cand.glob("*.txt"))):
            return cand
    raise FileNotFoundError(f"no data for {dataset} under {root}: expected {root / TASK_DIRS[task] / dataset} "
                            "or a dataset folder (see data/SOURCES.md for the layout).")


def _guess_layout(folder: Path) -> str:
    files = {p.name for p in folder.iterdir()}
    for layout, needed in [("magellan", {"tableA.csv", "tableB.csv"}), ("cells", {"table.csv"}),
                           ("raha", {"dirty.csv", "clean.csv"}), ("ditto", {"test.txt"}), ("splits", {"test.csv"})]:
        if needed <= files:
            return layout
    raise InputError(f"cannot tell the layout of {folder} from its files {sorted(files)}; see data/SOURCES.md.")


def _pairs(path: Path) -> pd.DataFrame:
    pairs = read_csv(path)
    require_columns(pairs, ["ltable_id", "rtable_id"], str(path))
    return pairs.astype({c: "int64" for c in ("ltable_id", "rtable_id", "label") if c in pairs.columns})


def _table(path: Path) -> pd.DataFrame:
    table = read_csv(path)
    require_columns(table, ["id"], str(path))
    return table.astype({"id": "int64"})


def _magellan(folder: Path, split: str, demo_split: str, spec: TaskSpec) -> MatchingInputs:
    return MatchingInputs(pairs=_pairs(folder / f"{split}.csv"), left=_table(folder / "tableA.csv"),
                          right=_table(folder / "tableB.csv"), demos=_pairs(folder / f"{demo_split}.csv"), spec=spec)


def _ditto(folder: Path, split: str, demo_split: str, spec: TaskSpec) -> MatchingInputs:
    return MatchingInputs(pairs=read_ditto(folder / f"{split}.txt"), demos=read_ditto(folder / f"{demo_split}.txt"),
                          spec=spec)


def _splits(folder: Path, split: str, demo_split: str, spec: TaskSpec) -> ImputationInputs:
    if spec.target is None:
        raise InputError("imputation data needs spec=TaskSpec(target=<column>).")
    rows = read_csv(folder / f"{split}.csv")
    require_columns(rows, [spec.target], str(folder / f"{split}.csv"))
    labels = rows[spec.target].copy()
    table = rows.assign(**{spec.target: pd.Series([None] * len(rows), dtype="object")})
    return ImputationInputs(table=table, target=spec.target, labels=labels,
                            demos=read_csv(folder / f"{demo_split}.csv"), spec=spec)


def _cells(folder: Path, split: str, demo_split: str, spec: TaskSpec) -> DetectionInputs:
    table = read_csv(folder / "table.csv")
    first = table.columns[0]
    if first in ("Unnamed: 0", "", "index", "row_id"):  # the saved pandas index is the row id
        table = table.set_index(first).rename_axis("row_id")
        table.index = table.index.astype("int64")
    cells = _cell_labels(folder / f"{split}.csv")
    demos = _cell_labels(folder / f"{demo_split}.csv")
    return DetectionInputs(table=table, columns=spec.columns, cells=cells[["row_id", "col_name"]],
                           labels=pd.concat([demos, cells], ignore_index=True), spec=spec)


def _cell_labels(path: Path) -> pd.DataFrame:
    labels = read_csv(path)
    require_columns(labels, ["row_id", "col_name"], str(path))
    return labels.astype({"row_id": "int64"})


def _raha(folder: Path, split: str, demo_split: str, spec: TaskSpec) -> DetectionInputs:
    dirty, clean = read_csv(folder / "dirty.csv"), read_csv(folder / "clean.csv")
    if "index" in dirty.columns:  # raha's 1-based row number; rows are keyed 0-based like Hospital
        dirty, clean = dirty.drop(columns="index"), clean.drop(columns=clean.columns[0])
    columns = list(spec.columns or attribute_columns(dirty.columns, spec.id_columns, spec.drop_columns))
    labels = cell_labels_from_clean(dirty, clean, columns)
    order = np.random.default_rng(RAHA_SPLIT["seed"]).permutation(len(labels))
    n_train, n_valid = int(RAHA_SPLIT["train"] * len(labels)), int(RAHA_SPLIT["valid"] * len(labels))
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, len(labels))}
    pick = {s: labels.iloc[np.sort(order[a:b])] for s, (a, b) in bounds.items()}
    return DetectionInputs(table=dirty, columns=columns, cells=pick[split][["row_id", "col_name"]],
                           labels=pd.concat([pick[demo_split], pick[split]], ignore_index=True), spec=spec)
