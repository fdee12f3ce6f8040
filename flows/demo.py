"""``make demo``: load the benchmark tables into DuckDB, match the Beer test pairs with the
embedded model through the ``wrangle`` flow, print the metrics and the SQL to read the outputs.

    python -m flows.demo [--database data/wrangle.duckdb] [--model qwen2.5-coder-1.5b] [--k 3]
                         [--limit N] [--chat]

Uses the Prefect server at PREFECT_API_URL when one is set (``make serve``); otherwise Prefect
starts a temporary local one for the duration of the demo.
"""

from __future__ import annotations

import argparse
import json
import os

# Before Prefect is imported: local-only defaults (the caller's environment wins).
os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

SQL = """\
-- quality of each run, computed from answers and gold labels
SELECT task, run_key, model, rows, unanswered, precision, recall, f1, accuracy FROM wrangle_scores;
-- one row per flow run: status, counts, throughput, metrics (JSON text)
SELECT run_id, status, input_rows, written_rows, quarantined_rows, rows_per_s, metrics
FROM wrangle_runs ORDER BY started_at DESC;
-- the answers next to the records they compare
SELECT a.Beer_Name AS left_name, b.Beer_Name AS right_name, r.answer, r.label, r.valid
FROM wrangle_entity_matching r
JOIN beer_table_a a ON a.id = CAST(r.ltable_id AS BIGINT)
JOIN beer_table_b b ON b.id = CAST(r.rtable_id AS BIGINT)
WHERE r.run_key = '{run_key}' LIMIT 10;
-- rows that failed validation, and why
SELECT row_key, reason, raw_output FROM wrangle_quarantine WHERE run_key = '{run_key}';"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="FlexWrangle demo: Beer entity matching")
    parser.add_argument("--database", default="data/wrangle.duckdb")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b",
                        help="model name or path (default: %(default)s; smollm2-135m is fast but too weak to match)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--chat", action="store_true")
    args = parser.parse_args(argv)

    from flows.load_benchmarks import load_benchmarks
    from flows.wrangle import wrangle

    counts = load_benchmarks(database=args.database)
    print(f"loaded {len(counts)} benchmark tables into {args.database}")
    result = wrangle(task="entity-matching", table="beer_test_pairs", left_table="beer_table_a",
                     right_table="beer_table_b", demos_table="beer_train_pairs", spec="Beer",
                     database=args.database, model=args.model, k=args.k, limit=args.limit,
                     chat=args.chat)
    print(json.dumps({k: result[k] for k in ("run_key", "status", "input_rows", "written_rows",
                                             "skipped_rows", "quarantined_rows", "rows_per_s",
                                             "tokens_per_s", "metrics")}, indent=2))
    _show_answers(args.database, result["run_key"])
    m = result.get("metrics") or {}
    if "f1" in m:
        print(f"\n{args.model} on {m.get('n', result['written_rows'])} Beer test pairs at k = {args.k}: "
              f"F1 {m['f1']:.3f} (precision {m['precision']:.3f}, recall {m['recall']:.3f}; "
              f"{m.get('tp')} of {m.get('positives')} true matches found, {m.get('fp')} false matches). "
              "Answering No everywhere scores 0; see docs/quality.md for every dataset and model.")
    print(f"\nRead the outputs with SQL, e.g. duckdb {args.database}:\n")
    print(SQL.format(run_key=result["run_key"]))
    return result


def _show_answers(database: str, run_key: str, n: int = 5) -> None:
    """A few of the model's answers next to the records it compared."""
    import duckdb

    with duckdb.connect(database, read_only=True) as con:
        rows = con.execute(
            "SELECT a.Beer_Name, b.Beer_Name, r.raw_output, r.answer, r.label "
            "FROM wrangle_entity_matching r "
            "JOIN beer_table_a a ON a.id = CAST(r.ltable_id AS BIGINT) "
            "JOIN beer_table_b b ON b.id = CAST(r.rtable_id AS BIGINT) "
            "WHERE r.run_key = ? ORDER BY r.label DESC, r.row_key LIMIT ?", [run_key, n]).fetchall()
    print("\nSome answers (left beer | right beer -> model says; gold label):")
    for left, right, raw, answer, label in rows:
        print(f"  {left} | {right} -> {raw.strip()!r} ({answer}); gold {label}")


if __name__ == "__main__":
    main()
