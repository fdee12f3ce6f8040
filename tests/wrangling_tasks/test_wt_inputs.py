"""Bad input raises errors that name the problem and the fix; benchmark loaders give documented counts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from wt_fakes import FakeLLM

from wrangling_tasks import (
    DATA,
    DetectionInputs,
    ImputationInputs,
    MatchingInputs,
    TaskSpec,
    get_task,
    load_benchmark,
    run,
)
from wrangling_tasks.base import InputError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"

# Positives per split, from data/SOURCES.md.
POSITIVES = {
    "Fodors-Zagats": (66, 22, 22), "Beer": (40, 14, 14), "iTunes-Amazon": (78, 27, 27),
    "Walmart-Amazon": (576, 193, 193), "Amazon-Google": (699, 234, 234), "DBLP-ACM": (1332, 444, 444),
    "Abt-Buy": (616, 206, 206), "Hospital": (44, 6, 459), "beers": (399, 39, 3924),
}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("name", list(DATA))
def test_loader_counts_match_sources_md(name, split):
    info = DATA[name]
    mod = get_task(info.task)
    inputs = load_benchmark(info.task, name, split)
    items = mod.make_items(inputs, inputs.spec.replace(question=inputs.spec.question or mod.DEFAULT_QUESTION))
    assert len(items) == info.counts[split]
    assert items["label"].notna().all()
    if name in POSITIVES:
        assert int(items["label"].sum()) == POSITIVES[name][("train", "valid", "test").index(split)]
    keys = list(mod.keys_for(inputs))
    assert not items.duplicated(keys).any()


def test_demonstrations_come_from_train_or_valid():
    test = load_benchmark("em", "Beer", "test")
    train = load_benchmark("em", "Beer", "train")
    assert len(test.demos) == 268 and len(train.demos) == 91


def test_loader_reads_a_user_folder_in_the_same_layout(tmp_path):
    folder = tmp_path / "MyBeer"
    shutil.copytree(DATA_DIR / "entity_matching" / "Beer", folder)
    inputs = load_benchmark("entity-matching", "MyBeer", "test", data_dir=folder)
    result = run("em", inputs, FakeLLM(), limit=3, progress=False)
    assert len(result.predictions) == 3
    assert "Beer_Name: " in result.predictions["prompt"][0]  # no dataset spec: raw column names
    same = load_benchmark("entity-matching", "Beer", "test", data_dir=DATA_DIR)
    assert len(same.pairs) == 91


@pytest.mark.parametrize("call, message", [
    (lambda: load_benchmark("em", "Nope", "test"), "unknown entity-matching dataset 'Nope'"),
    (lambda: load_benchmark("imputation", "Beer", "test"), "Beer is a entity-matching dataset"),
    (lambda: load_benchmark("em", "Beer", "dev2"), "unknown split"),
    (lambda: get_task("sorting"), "unknown task 'sorting'"),
])
def test_unknown_names(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_missing_data_dir_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected"):
        load_benchmark("em", "Mine", "test", data_dir=tmp_path)


@pytest.mark.parametrize("task, inputs, message", [
    ("em", pd.DataFrame({"a": [1]}), "neither layout"),
    ("em", MatchingInputs(pairs=pd.DataFrame({"ltable_id": [1], "rtable_id": [2]})), "need the left"),
    ("em", MatchingInputs(pairs=pd.DataFrame({"ltable_id": [9], "rtable_id": [0]}),
                          left=pd.DataFrame({"id": [0], "x": ["a"]}), right=pd.DataFrame({"id": [0], "x": ["b"]})),
     "not in the left"),
    ("em", MatchingInputs(pairs=pd.DataFrame({"ltable_id": [0], "rtable_id": [0]}),
                          left=pd.DataFrame({"key": [0]}), right=pd.DataFrame({"id": [0]})), "missing column"),
    ("em", pd.DataFrame({"left_a": [], "right_a": []}), "empty"),
    ("imputation", pd.DataFrame({"a": [1]}), "needs a target column"),
    ("imputation", ImputationInputs(pd.DataFrame({"a": [1]}), "city"), "missing column"),
    ("imputation", ImputationInputs(pd.DataFrame({"city": ["x"]}), "city"), "nothing to impute"),
    ("imputation", ImputationInputs(pd.DataFrame({"city": []}), "city"), "empty"),
    ("ed", pd.DataFrame({"a": []}), "empty"),
    ("ed", DetectionInputs(pd.DataFrame({"a": [1]}), columns=["b"]), "not in the table"),
    ("ed", DetectionInputs(pd.DataFrame({"a": [1]}), cells=pd.DataFrame({"row_id": [5], "col_name": ["a"]})),
     "not in the table"),
    ("ed", DetectionInputs(pd.DataFrame({"a": [1]}), clean=pd.DataFrame({"a": [1, 2]})), "same rows"),
    ("ed", DetectionInputs(pd.DataFrame({"a": [1]}), labels=pd.DataFrame({"row_id": [0], "col_name": ["a"]})),
     "is_error"),
    ("ed", [1, 2], "DetectionInputs or a DataFrame"),
])
def test_bad_inputs_raise_clear_errors(task, inputs, message):
    with pytest.raises(InputError, match=message):
        run(task, inputs, FakeLLM(), progress=False)


def test_bad_run_arguments():
    inputs = load_benchmark("em", "Beer", "test")
    with pytest.raises(InputError, match="limit"):
        run("em", inputs, FakeLLM(), limit=0, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        run("em", inputs, FakeLLM(), batch_size=0, progress=False)
    with pytest.raises(InputError, match="yes/no"):
        run("em", MatchingInputs(pairs=inputs.pairs.assign(label="maybe"), left=inputs.left, right=inputs.right),
            FakeLLM(), progress=False)


def test_llm_returning_wrong_count_is_an_error():
    class Broken(FakeLLM):
        def generate_text(self, prompts, max_new_tokens, stop="\n", do_sample=False):
            return ["Yes"]

    with pytest.raises(RuntimeError, match="returned 1 texts for 2 prompts"):
        run("em", load_benchmark("em", "Beer", "test"), Broken(), limit=4, batch_size=2, progress=False)


def test_spec_argument_overrides_dataset_spec():
    inputs = load_benchmark("em", "Beer", "test")
    spec = TaskSpec(question="Same {entity}?", entity="Beer")
    prompt = run("em", inputs, FakeLLM(), spec=spec, limit=1, progress=False).predictions["prompt"][0]
    assert prompt.startswith("Beer A is Beer_Name: ") and prompt.endswith("Same Beer?")
