"""Plain pieces of the flow (no Prefect server): run keys, row identity, models, schema."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from flows import llms, steps, store
from flows import params as params_mod
from wrangling_tasks.base import InputError


def params(**kw):
    return params_mod.WrangleParams(**{"task": "entity-matching", "table": "pairs", **kw})


def test_run_key_covers_what_changes_answers_only():
    base = params()
    assert base.run_key() == params().run_key()
    for same in (dict(limit=5), dict(batch_size=8), dict(chunk_size=3), dict(database="x.duckdb")):
        assert params(**same).run_key() == base.run_key(), same
    for other in (dict(model="m2"), dict(k=3), dict(seed=1), dict(tag="t"), dict(chat=True),
                  dict(policy={"gpu_batch_size": 4}), dict(spec="Beer"), dict(table="p2")):
        assert params(**other).run_key() != base.run_key(), other


def test_params_are_checked_before_anything_runs():
    with pytest.raises(InputError, match="unknown task"):
        params(task="summarise")
    with pytest.raises(InputError, match="does not use"):
        params(cells_table="cells")
    with pytest.raises(InputError, match="target"):
        params(task="imputation")
    with pytest.raises(InputError, match="limit"):
        params(limit=0)
    with pytest.raises(InputError, match="policy"):
        params(policy="fast")


def test_row_identity_is_unique_even_with_duplicate_and_null_keys():
    frame = pd.DataFrame({"a": [1, 1, None, 1], "b": ["x", "x", "y", "z"]})
    row_key, occurrence = steps.row_identity(frame, ["a", "b"])
    assert row_key == ['["1", "x"]', '["1", "x"]', '[null, "y"]', '["1", "z"]']
    assert occurrence == [0, 1, 0, 0]
    done = pd.DataFrame({"row_key": ['["1", "x"]'], "occurrence": [1]})
    items = frame.assign(row_key=row_key, occurrence=occurrence)
    assert steps.pending(items, done).index.tolist() == [0, 2, 3]


def test_constant_model_and_unknown_models():
    llm = llms.load_llm("constant:No")
    assert llm.generate_text(["a", "b"], max_new_tokens=3, stop="\n") == ["No", "No"]
    with pytest.raises(llms.ModelLoadError, match="non-empty"):
        llms.load_llm("  ")
    with pytest.raises(llms.ModelLoadError, match="policy"):
        llms.load_llm("smollm2-135m", policy={"no_such_field": 1})


def test_infer_keeps_input_order_and_counts_reported_tokens():
    class Counting:
        last_stats: dict = {}

        def generate_text(self, prompts, max_new_tokens, stop, **kw):
            self.last_stats = {"new_tokens": len(prompts)}
            return [p.upper() for p in prompts]

    out = steps.infer(Counting(), ["bb", "a", "ccc", "dddd", "e"], 3, batch_size=2)
    assert out.raw == ["BB", "A", "CCC", "DDDD", "E"] and out.tokens == 5
    assert steps.infer(llms.ConstantLLM("x"), ["p"], 3, 2).tokens is None


def test_schema_is_idempotent_and_the_scores_view_follows_the_task_rules():
    con = duckdb.connect()
    store.ensure_schema(con)
    store.ensure_schema(con)
    con.execute("INSERT INTO wrangle_entity_matching (run_key, row_key, occurrence, answer, label) "
                "VALUES ('r', '1', 0, true, true), ('r', '2', 0, NULL, false), "
                "('r', '3', 0, false, true), ('r', '4', 0, true, false), ('r', '5', 0, true, NULL)")
    con.execute("INSERT INTO wrangle_imputation (run_key, row_key, occurrence, answer, label) "
                "VALUES ('i', '1', 0, 'New  York', 'new york'), ('i', '2', 0, NULL, 'x')")
    scores = con.execute("SELECT * FROM wrangle_scores ORDER BY task").df().set_index("task")
    from wrangling_tasks.scoring import accuracy_metrics, binary_metrics

    ref = binary_metrics([True, None, False, True, True], [True, False, True, False, None])
    em = scores.loc["entity-matching"]
    assert (em["tp"], em["fp"], em["fn"], em["tn"]) == (ref["tp"], ref["fp"], ref["fn"], ref["tn"])
    assert em["f1"] == pytest.approx(ref["f1"]) and em["unanswered"] == ref["unanswered"]
    acc = accuracy_metrics(["New  York", None], ["new york", "x"])["accuracy"]
    assert scores.loc["imputation", "accuracy"] == pytest.approx(acc)


def test_every_entry_point_defaults_to_the_registry_default_model():
    import inspect
    from pathlib import Path

    import yaml

    from engine.registry import DEFAULT_MODEL
    from flows.scale_out import wrangle_scale_out
    from flows.wrangle import wrangle

    assert steps.WrangleParams.__dataclass_fields__["model"].default == DEFAULT_MODEL
    for flow in (wrangle, wrangle_scale_out):
        assert inspect.signature(flow.fn).parameters["model"].default == DEFAULT_MODEL
    deploy = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    assert deploy["definitions"]["parameters"]["engine"]["model"] == DEFAULT_MODEL
    for module in ("flows/demo.py", "wrangling_tasks/__main__.py"):
        text = (Path(__file__).resolve().parents[2] / module).read_text()
        assert f'"--model", default="{DEFAULT_MODEL}"' in text, module


def test_an_item_is_pending_when_its_stored_prompt_differs_and_keyless_tables_are_keyed_by_content():
    from flows import resume

    items = pd.DataFrame({"row_key": ["a", "b", "c"], "occurrence": [0, 0, 0], "prompt_hash": ["1", "2", "3"]})
    stored = pd.DataFrame({"row_key": ["a", "b"], "occurrence": [0, 0], "prompt_hash": ["1", "old"]})
    todo = steps.pending(items, stored)
    assert todo["row_key"].tolist() == ["b", "c"] and resume.replaced(todo, stored) == 1
    import wrangling_tasks as wt
    pairs = pd.DataFrame({"left_name": ["x"], "right_name": ["y"]})
    em, di, ed = (wt.get_task(t) for t in ("entity-matching", "imputation", "error-detection"))
    assert em.keyed_by_content(wt.MatchingInputs(pairs=pairs))
    assert not em.keyed_by_content(wt.MatchingInputs(pairs=pairs.assign(pair_id=[7])))
    table = pd.DataFrame({"city": [None], "name": ["a"]})
    assert di.keyed_by_content(wt.ImputationInputs(table=table, target="city"))
    assert not ed.keyed_by_content(wt.DetectionInputs(table=table.assign(row_id=[3])))
    rendered = pd.DataFrame({"body": ["same", "same", "other"], "question": ["q"] * 3})
    ids = resume.identities(rendered, ("pair_id",), by_content=True)
    assert ids["row_key"][0] == ids["row_key"][1] != ids["row_key"][2] and ids["occurrence"].tolist() == [0, 1, 0]


def test_an_older_database_gains_the_new_columns_and_its_rows_count_as_current():
    con = duckdb.connect()
    old = [(c, t) for c, t in store.result_columns("entity-matching") if c != "stale_since"]
    con.execute("CREATE TABLE wrangle_entity_matching (" + ", ".join(f"{c} {t}" for c, t in old) + ")")
    con.execute("CREATE TABLE wrangle_runs (run_id VARCHAR PRIMARY KEY, run_key VARCHAR NOT NULL, "
                "task VARCHAR NOT NULL, status VARCHAR NOT NULL)")
    con.execute("INSERT INTO wrangle_entity_matching (run_key, row_key, occurrence, answer, label) "
                "VALUES ('r', '1', 0, true, true)")
    store.ensure_schema(con)
    assert {"stale_since"} <= {r[0] for r in con.execute("DESCRIBE wrangle_entity_matching").fetchall()}
    runs = {r[0] for r in con.execute("DESCRIBE wrangle_runs").fetchall()}
    assert {"host", "pid", "replaced_rows", "stale_rows"} <= runs
    assert con.execute("SELECT rows, tp FROM wrangle_scores").fetchall() == [(1, 1)]


def test_deployments_run_one_at_a_time_and_a_later_trigger_waits():
    from pathlib import Path

    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = PrefectYamlModel.model_validate(
        yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text()))
    limits = {(d.entrypoint, d.name): d.concurrency_limit for d in spec.deployments}
    for (entrypoint, name), limit in limits.items():
        if entrypoint in ("flows/wrangle.py:wrangle", "flows/scale_out.py:wrangle_scale_out"):
            assert (limit.limit, limit.collision_strategy) == (1, "ENQUEUE"), name
    assert limits[("flows/scale_out.py:wrangle_partition", "partition")] is None   # partitions run side by side
