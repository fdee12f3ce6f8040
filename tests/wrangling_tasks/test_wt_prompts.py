"""Golden prompt strings: serialisation, the paper's questions, few-shot layout."""

from __future__ import annotations

import pandas as pd
import pytest
from wt_fakes import FakeLLM

from wrangling_tasks import (
    DetectionInputs,
    ImputationInputs,
    MatchingInputs,
    TaskSpec,
    load_benchmark,
    run,
)
from wrangling_tasks.serialize import attribute_columns, serialize_row


def prompts_of(task, inputs, **kw):
    return list(run(task, inputs, FakeLLM(), progress=False, **kw).predictions["prompt"])


def test_serialize_row_joins_pairs_and_leaves_missing_empty():
    row = {"id": 7, "name": " Fat Tire ", "abv": None, "ibu": float("nan"), "year": 1999}
    cols = attribute_columns(row.keys(), id_columns=("id",))
    assert cols == ["name", "abv", "ibu", "year"]
    assert serialize_row(row, cols) == "name: Fat Tire. abv: . ibu: . year: 1999"
    assert serialize_row(row, ["name"], rename={"name": "beer"}) == "beer: Fat Tire"


def test_entity_matching_magellan_prompt(tables):
    left, right, pairs = tables
    got = prompts_of("entity-matching", MatchingInputs(pairs=pairs.iloc[:2], left=left, right=right))
    assert got == [
        "Product A is name: item 0. price: 1.5. Product B is name: thing 0. price: 1.5. "
        "Are Product A and Product B the same?",
        "Product A is name: item 1. price: . Product B is name: thing 1. price: 2. "
        "Are Product A and Product B the same?",
    ]


def test_entity_matching_pairs_layout_prompt_and_spec():
    pairs = pd.DataFrame({"left_title": ["a"], "left_brand": ["x"], "right_title": ["b"], "right_brand": [None]})
    spec = TaskSpec(entity="Song", drop_columns=("brand",), rename={"title": "name"})
    result = run("em", pairs, FakeLLM(), spec=spec, progress=False)
    assert result.predictions["prompt"][0] == "Song A is name: a. Song B is name: b. Are Song A and Song B the same?"
    assert result.key_columns == ("pair_id",)
    assert result.predictions["pair_id"].tolist() == [0]


def test_beer_benchmark_prompt_is_the_papers_format():
    got = prompts_of("entity-matching", load_benchmark("entity-matching", "Beer", "test"), limit=1)
    assert got == [
        "Product A is name: Bulleit Bourbon Barrel Aged G'Knight. factory: Oskar Blues Grill & Brew. "
        "Product B is name: Figure Eight Bourbon Barrel Aged Jumbo Love. factory: Figure Eight Brewing. "
        "Are Product A and Product B the same?"
    ]


def test_fodors_zagats_drops_the_leaking_class_column():
    prompts = prompts_of("entity-matching", load_benchmark("entity-matching", "Fodors-Zagats", "test"), limit=20)
    assert all("class:" not in p for p in prompts)
    assert prompts[0].startswith("Product A is name: citrus. addr: ' 6703 melrose ave. '. city: ` los angeles '.")


def test_itunes_prompt_uses_song_noun_and_drops_copyright():
    got = prompts_of("entity-matching", load_benchmark("entity-matching", "iTunes-Amazon", "test"), limit=1)[0]
    assert got.startswith("Song A is name: Elevator ( feat . Timbaland ). artist name: Flo Rida. album name: ")
    assert got.endswith("released: March 17 , 2008. Same Song?")
    assert "CopyRight" not in got and "Atlantic Recording" not in got


def test_imputation_prompts():
    restaurant = prompts_of("imputation", load_benchmark("imputation", "Restaurant", "test"), limit=1)
    assert restaurant == ["name: chez michel. addr: 804 northpoint. phone: 415/775-7036. type: french. What is the city?"]
    buy = prompts_of("imputation", load_benchmark("imputation", "Buy", "test"), limit=1)
    assert buy == ["name: Onkyo TX-NR906 A/V Receiver - TXNR906B. description: THX Ultra 2, Dolby Digital Plus, "
                   "Dolby TrueHD, DTS-HD, Neural SurroundFM, AM. Who is the manufacturer?"]


def test_imputation_user_table_default_question():
    table = pd.DataFrame({"id": [1, 2], "name": ["a", "b"], "color": ["red", None]})
    got = prompts_of("imputation", ImputationInputs(table, "color"))
    assert got == ["name: b. What is the color?"]


def test_error_detection_prompts():
    hospital = prompts_of("error-detection", load_benchmark("error-detection", "Hospital", "test"), limit=1)
    assert hospital == ["Is there a x spelling error in EmergencyService: yes?"]
    table = pd.DataFrame({"city": ["bxrmingham", None]})
    assert prompts_of("ed", DetectionInputs(table)) == [
        "Is there a x spelling error in city: bxrmingham?", "Is there a x spelling error in city: ?"]


def test_few_shot_prefix_is_shared_and_blank_line_separated(tables):
    left, right, pairs = tables
    inputs = MatchingInputs(pairs=pairs.iloc[:2], left=left, right=right, demos=pairs.iloc[6:].assign(label=[1, 0, 0, 0]))
    result = run("em", inputs, FakeLLM(), k=2, seed=0, progress=False)
    p0, p1 = result.predictions["prompt"]
    demos = result.prefix.split("\n\n")
    assert len(demos) == 3 and demos[2] == ""  # two demos, then a blank line before the query
    assert sorted(d.rsplit(" ", 1)[1] for d in demos[:2]) == ["No", "Yes"]  # class-balanced
    assert all(d.endswith("Are Product A and Product B the same? " + d.rsplit(" ", 1)[1]) for d in demos[:2])
    assert p0.startswith(result.prefix) and p1.startswith(result.prefix)
    assert p0[len(result.prefix):].startswith("Product A is name: item 0.")
    assert result.predictions["n_demos"].tolist() == [2, 2]


def test_answer_prefix_goes_after_question_in_demos_and_queries(tables):
    left, right, pairs = tables
    inputs = MatchingInputs(pairs=pairs.iloc[:1], left=left, right=right, demos=pairs.iloc[5:7])
    spec = TaskSpec(answer_prefix="\nAnswer:")
    prompt = prompts_of("em", inputs, k=1, spec=spec)[0]
    demo, query = prompt.split("\n\n")
    assert demo.endswith("the same?\nAnswer: No")
    assert query.endswith("the same?\nAnswer:")


@pytest.mark.parametrize("question", ["Is {cell} wrong?", "Check {cell}. Any error?"])
def test_error_detection_custom_question(question):
    table = pd.DataFrame({"zip": ["3x233"]})
    got = prompts_of("ed", DetectionInputs(table), spec=TaskSpec(question=question))
    assert got == [question.format(cell="zip: 3x233")]


def test_questions_only_fill_known_placeholders():
    pairs = pd.DataFrame({"left_a": ["x"], "right_a": ["y"]})
    got = prompts_of("em", pairs, spec=TaskSpec(question="Same {entity} {json: 1}?"))
    assert got == ["Product A is a: x. Product B is a: y. Same Product {json: 1}?"]


def test_spec_is_hashable_and_comparable():
    spec = TaskSpec(rename={"a": "b"}, drop_columns=("c",))
    assert hash(spec) == hash(spec.replace()) and spec == spec.replace()
    assert spec != spec.replace(rename={}) and len({spec, spec.replace(), spec.replace(entity="Song")}) == 2
