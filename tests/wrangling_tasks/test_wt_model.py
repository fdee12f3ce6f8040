"""With the embedded model (SmolLM2-135M): 20 Beer test pairs end to end. Skipped without it."""

from __future__ import annotations

import pytest

from wrangling_tasks import load_benchmark, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    engine = pytest.importorskip("engine")
    try:
        return engine.LLM.from_pretrained("smollm2-135m", progress=False)
    except (FileNotFoundError, ImportError, OSError, ValueError) as exc:
        pytest.skip(f"embedded model not available: {exc}")


def test_twenty_beer_pairs_all_predicted_and_scored(llm):
    inputs = load_benchmark("entity-matching", "Beer", "test")
    result = run("entity-matching", inputs, llm, k=0, limit=20, batch_size=8, progress=False)
    preds = result.predictions
    assert len(preds) == 20
    assert preds[["ltable_id", "rtable_id"]].values.tolist() == inputs.pairs[["ltable_id", "rtable_id"]].iloc[:20].values.tolist()
    assert preds["raw_output"].notna().all() and preds["label"].notna().all()
    m = result.metrics
    assert m["n"] == 20 and m["tp"] + m["fp"] + m["fn"] + m["tn"] == 20
    assert 0.0 <= m["f1"] <= 1.0 and 0 <= m["unanswered"] <= 20
    assert result.rows_per_s > 0
