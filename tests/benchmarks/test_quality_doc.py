"""benchmarks/quality.py renders docs/quality.md from its results file and keeps the hand-written reading."""
import json
from types import SimpleNamespace

from benchmarks import quality


def _row(model, dataset, k, variant="", score=0.5):
    return dict(model=model, dataset=dataset, task="entity-matching", k=k, variant=variant, n=50, metric="f1",
                score=score, unanswered=0, yes=10, positives=7, majority=0.0, rows_per_s=1.0, demos=k,
                seconds=50.0, limit=50, commit="abc1234", finished="2026-12-07 08:00")


def test_the_last_run_of_each_key_wins_and_the_reading_survives(tmp_path):
    results, out = tmp_path / "q.jsonl", tmp_path / "quality.md"
    runs = [_row("qwen2.5-coder-1.5b", "Beer", 3, score=0.1), _row("qwen2.5-coder-1.5b", "Beer", 3, score=0.778),
            _row("qwen2.5-coder-1.5b", "Beer", 0, score=0.444), _row("smollm2-135m", "Beer", 3, score=0.0),
            _row("qwen2.5-coder-1.5b", "Beer", 3, variant="choice", score=0.6)]
    results.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out.write_text("# old table\n\n## Reading\n\nWritten by hand.\n")

    quality.write(quality.load(results), SimpleNamespace(out=str(out)), results)

    text = out.read_text()
    assert "| Beer | entity-matching | 50 | 0.0 | 24.6 | 78.6 / 100 | 44.4 | 77.8 |  | 0.0 |" in text
    assert "10.0" not in text                                    # the earlier run of the same key is replaced
    assert "| Qwen2.5-Coder-1.5B | Beer | 77.8 |  | 60.0 |" in text
    assert text.rstrip().endswith("## Reading\n\nWritten by hand.") and "# old table" not in text
