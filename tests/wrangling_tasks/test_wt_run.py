"""run() with fake llms: every item answered, input order kept, batching, context fitting."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from wt_fakes import ChoiceLLM, FakeLLM, WordTokenizer, expected_yes

from wrangling_tasks import (
    TASKS,
    DetectionInputs,
    ImputationInputs,
    MatchingInputs,
    TaskSpec,
    get_task,
    holdout,
    load_benchmark,
    run,
)
from wrangling_tasks.base import PREDICTION_COLUMNS


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64, 1000])
def test_every_row_answered_in_input_order(batch_size):
    inputs = load_benchmark("entity-matching", "Beer", "test")
    llm = FakeLLM()
    result = run("entity-matching", inputs, llm, k=2, batch_size=batch_size, progress=False)
    preds = result.predictions
    assert len(preds) == 91  # 91 % batch_size != 0 for most sizes: the tail batch is kept
    assert preds[["ltable_id", "rtable_id"]].values.tolist() == inputs.pairs[["ltable_id", "rtable_id"]].values.tolist()
    assert preds["answer"].tolist() == [expected_yes(p) for p in preds["prompt"]]  # answer belongs to its prompt
    sent = [p for call in llm.calls for p in call["prompts"]]
    assert sorted(sent) == sorted(preds["prompt"])  # each prompt sent exactly once
    assert all(len(c["prompts"]) <= batch_size for c in llm.calls)
    assert len(llm.calls) == -(-91 // batch_size)
    assert preds["label"].tolist() == [bool(v) for v in inputs.pairs["label"]]
    assert list(preds.columns) == ["ltable_id", "rtable_id", *PREDICTION_COLUMNS]


def test_batches_are_sorted_by_length_and_decoding_is_greedy_with_newline_stop():
    llm = FakeLLM()
    run("imputation", load_benchmark("imputation", "Restaurant", "test"), llm, batch_size=10, progress=False)
    lengths = [len(p) for c in llm.calls for p in c["prompts"]]
    assert lengths == sorted(lengths, reverse=True)
    assert {(c["max_new_tokens"], c["stop"], c["do_sample"]) for c in llm.calls} == {(5, "\n", False)}


def test_prompt_hash_and_raw_output():
    result = run("ed", load_benchmark("ed", "Hospital", "test"), FakeLLM(), limit=5, progress=False)
    preds = result.predictions
    assert preds["prompt_hash"].tolist() == [hashlib.sha256(p.encode()).hexdigest()[:16] for p in preds["prompt"]]
    assert set(preds["raw_output"]) <= {" Yes\nignored", " No."}
    assert result.key_columns == ("row_id", "col_name")


def test_imputation_answers_scored_against_hidden_labels():
    inputs = load_benchmark("imputation", "Restaurant", "test")
    truth = list(inputs.labels)
    answers = {p: t for p, t in zip(
        run("imputation", inputs, FakeLLM(), progress=False).predictions["prompt"], truth)}
    oracle = FakeLLM(answer=lambda p: " " + answers[p].upper() + ".\nmore")
    result = run("imputation", inputs, oracle, progress=False)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["n"] == 86
    assert result.predictions["answer"].tolist() == [t.upper() for t in truth]
    assert all(inputs.table["city"].isna())  # the benchmark hides the test labels


def test_imputation_demos_come_from_known_rows_only():
    table = pd.DataFrame({"name": ["a", "b", "c", "d"], "city": ["rome", None, "paris", None]})
    result = run("imputation", ImputationInputs(table, "city"), FakeLLM(), k=5, progress=False)
    assert result.predictions["row_id"].tolist() == [1, 3]
    assert result.n_demos == 2 and "What is the city? rome" in result.prefix
    assert result.metrics is None  # no labels: no metrics
    assert result.warnings and "k=5" in result.warnings[0]


def test_holdout_hides_known_values_for_evaluation():
    table = pd.DataFrame({"name": list("abcdefghij"), "city": ["x"] * 10})
    inputs = holdout(table, "city", frac=0.3, seed=0)
    result = run("imputation", inputs, FakeLLM(answer=lambda p: "X"), k=2, progress=False)
    assert len(result.predictions) == 3 and result.metrics["accuracy"] == 1.0
    assert table["city"].notna().all()  # the caller's table is untouched


def test_error_detection_with_clean_twin_and_cell_labels():
    dirty = pd.DataFrame({"city": ["bxrmingham", "dothan"], "state": ["al", "al"]})
    clean = pd.DataFrame({"City": ["birmingham", "dothan"], "State": ["al", "al"]})  # matched by position
    result = run("ed", DetectionInputs(dirty, clean=clean), FakeLLM(answer=lambda p: "yes" if "bx" in p else "no"),
                 progress=False)
    preds = result.predictions
    assert preds[["row_id", "col_name"]].values.tolist() == [[0, "city"], [0, "state"], [1, "city"], [1, "state"]]
    assert preds["label"].tolist() == [True, False, False, False]
    assert result.metrics["f1"] == 1.0
    labels = pd.DataFrame({"row_id": [0, 1], "col_name": ["city", "city"], "is_clean": [0, 1]})
    cells = pd.DataFrame({"row_id": [1], "col_name": ["city"]})
    result = run("ed", DetectionInputs(dirty, cells=cells, labels=labels), FakeLLM(), k=1, progress=False)
    assert result.predictions["label"].tolist() == [False]
    assert result.prefix == "Is there a x spelling error in city: bxrmingham? Yes\n\n"  # the other labelled cell


def test_matching_demos_exclude_item_pairs(tables):
    left, right, pairs = tables
    inputs = MatchingInputs(pairs=pairs, left=left, right=right, demos=pairs)
    result = run("em", inputs, FakeLLM(), k=4, progress=False)
    assert result.n_demos == 0 and result.warnings


def test_choice_scoring_uses_score_choices():
    llm = ChoiceLLM()
    result = run("em", load_benchmark("em", "Beer", "test"), llm, limit=9, batch_size=4, use_choice_scoring=True,
                 progress=False)
    assert all(c.get("choices") == [" Yes", " No"] for c in llm.calls)
    assert result.predictions["raw_output"].tolist() == ["Yes" if expected_yes(p) else "No"
                                                         for p in result.predictions["prompt"]]
    fallback = run("em", load_benchmark("em", "Beer", "test"), FakeLLM(), limit=3, use_choice_scoring=True,
                   progress=False)
    assert fallback.predictions["answer"].notna().all() and "ignored" in fallback.warnings[0]


def test_unparseable_answers_are_kept_as_null_and_counted():
    result = run("em", load_benchmark("em", "Beer", "test"), FakeLLM(answer=lambda p: " maybe"), limit=10,
                 progress=False)
    assert len(result.predictions) == 10 and result.predictions["answer"].isna().all()
    assert result.metrics["unanswered"] == 10 and result.metrics["accuracy"] == 0.0


def test_context_fitting_drops_demos_then_truncates():
    tok = WordTokenizer()
    table = pd.DataFrame({"name": ["short", " ".join(["long"] * 40), " ".join(["huge"] * 200)],
                          "city": [None, None, None]})
    demos = pd.DataFrame({"name": [f"demo {i} " + "w " * 10 for i in range(3)], "city": ["rome"] * 3})
    llm = FakeLLM(tokenizer=tok, max_context=80)
    spec = TaskSpec(target="city", max_new_tokens=5)
    result = run("imputation", ImputationInputs(table, demos=demos), llm, k=3, spec=spec, progress=False)
    preds = result.predictions
    assert preds["n_demos"].tolist()[0] == 3 and preds["n_demos"].tolist()[2] == 0
    assert 0 <= preds["n_demos"].tolist()[1] < 3
    assert preds["truncated"].tolist() == [False, False, True]
    assert all(len(p.split()) <= 80 - 5 for p in preds["prompt"])
    assert preds["prompt"][2].endswith("huge ... What is the city?")
    assert len(result.warnings) == 2


def test_expectations_for_the_flows():
    result = run("em", load_benchmark("em", "iTunes-Amazon", "test"), FakeLLM(), limit=4, progress=False)
    exp = result.expectations()
    assert exp.key_columns == ("pair_id",) and exp.allowed_answers == (True, False) and exp.row_count == 4
    assert set(exp.required_columns) <= set(result.predictions.columns)
    assert get_task("imputation").allowed_answers is None
    assert get_task("error_detection").key_columns == ("row_id", "col_name")
    assert set(TASKS) == {"entity-matching", "imputation", "error-detection"}
    assert get_task("imputation").expectations().allowed_answers is None


def test_prepare_builds_the_same_prompts_as_run_without_a_model():
    from wrangling_tasks import prepare

    inputs = load_benchmark("ed", "Hospital", "test")
    prep = prepare("error-detection", inputs, k=4, limit=12)
    result = run("error-detection", inputs, FakeLLM(), k=4, limit=12, progress=False)
    assert prep.items["prompt"].tolist() == result.predictions["prompt"].tolist()
    assert list(prep.items.columns) == ["row_id", "col_name", "prompt", "prompt_hash", "label", "n_demos", "truncated"]
    assert prep.spec.max_new_tokens == 3 and prep.n_demos == 4 and prep.key_columns == ("row_id", "col_name")
