"""CLI: run one wrangling task on one benchmark dataset and print the metrics.

    python -m wrangling_tasks --task entity-matching --dataset Beer --split test --k 3 --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from wrangling_tasks.base import InputError
from wrangling_tasks.datasets import DATA, load_benchmark
from wrangling_tasks.registry import TASKS, get_task
from wrangling_tasks.runner import run


def _parser() -> argparse.ArgumentParser:
    datasets = "; ".join(f"{t}: {', '.join(n for n, d in DATA.items() if d.task == t)}" for t in TASKS)
    p = argparse.ArgumentParser(
        prog="python -m wrangling_tasks",
        description="Prompt a language model to match entities, impute values or detect errors on a "
                    "benchmark dataset; print precision/recall/F1 (or accuracy) and rows/s.",
        epilog=f"Datasets — {datasets}. --data-dir may point at your own folder in the same layout "
               "(tableA.csv, tableB.csv, train|valid|test.csv for matching; see data/SOURCES.md).",
    )
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--dataset", required=True, help="dataset name (see below)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="(default: %(default)s)")
    p.add_argument("--k", type=int, default=0, help="few-shot demonstrations, from the train split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing demonstrations (default: %(default)s)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b",
                   help="model name or path for engine.LLM.from_pretrained (default: %(default)s; "
                        "smollm2-135m is fast but too weak to match)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (default: all)")
    p.add_argument("--data-dir", type=Path, default=None, help="data root (<task>/<Dataset>/...) or one dataset folder (default: the repo's data/)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default: %(default)s)")
    p.add_argument("--choice-scoring", action="store_true",
                   help="answer Yes/No tasks by scoring both answers instead of generating")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template (helps small instruct models at k=0)")
    p.add_argument("--answer-prefix", default=None,
                   help='text after the question, e.g. "\\nAnswer:" (default: none, the paper\'s format)')
    p.add_argument("--int8", action="store_true",
                   help="int8 products in the decoder layers (engine Policy.int8_matmul): about 2.5x faster on "
                        "CPUs with VNNI/AMX, answers may differ slightly (docs/benchmarks.md, int8_accuracy)")
    p.add_argument("--output", type=Path, default=None, help="write predictions to this CSV (or .parquet)")
    p.add_argument("--show-prompt", action="store_true", help="print the first prompt")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        mod = get_task(args.task)
        inputs = load_benchmark(mod.NAME, args.dataset, args.split, data_dir=args.data_dir)
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = inputs.spec
    if args.answer_prefix is not None:
        spec = spec.replace(answer_prefix=args.answer_prefix.encode().decode("unicode_escape"))

    from engine import LLM  # lazy: the engine is heavy and only the CLI needs it

    t0 = time.perf_counter()
    # progress=False: one progress bar (ours, per row) is enough
    llm = LLM.from_pretrained(args.model, progress=False, policy={"int8_matmul": True} if args.int8 else None)
    load_s = time.perf_counter() - t0
    result = run(mod.NAME, inputs, llm, k=args.k, seed=args.seed, spec=spec, limit=args.limit,
                 batch_size=args.batch_size, progress=not args.no_progress,
                 use_choice_scoring=args.choice_scoring,
                 generate_kwargs={"chat": True} if args.chat else None)
    if args.show_prompt:
        print(result.predictions["prompt"].iloc[0], "\n---")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        writer = result.predictions.to_parquet if args.output.suffix == ".parquet" else result.predictions.to_csv
        writer(args.output, index=False)

    summary = {
        "task": mod.NAME, "dataset": args.dataset, "split": args.split, "model": args.model,
        "k": args.k, "chat": args.chat, "demos_used": result.n_demos, "items": len(result.predictions),
        "metrics": result.metrics, "seconds": round(result.seconds, 2),
        "rows_per_s": round(result.rows_per_s, 3), "model_load_s": round(load_s, 2),
        "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    print(f"{s['task']} / {s['dataset']} / {s['split']}  model={s['model']}  k={s['k']} "
          f"(demos used: {s['demos_used']})  items={s['items']}")
    m = s["metrics"]
    if m is None:
        print("no labels: no metrics")
    elif "f1" in m:
        print(f"F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
              f"accuracy {m['accuracy']:.3f}  (tp {m['tp']} fp {m['fp']} fn {m['fn']} tn {m['tn']}, "
              f"unanswered {m['unanswered']})")
    else:
        print(f"accuracy {m['accuracy']:.3f}  ({m['correct']}/{m['n']} correct, unanswered {m['unanswered']})")
    print(f"{s['rows_per_s']:.2f} rows/s  ({s['items']} rows in {s['seconds']:.1f} s; model load {s['model_load_s']:.1f} s)")
    for w in s["warnings"]:
        print(f"warning: {w}")


if __name__ == "__main__":
    sys.exit(main())
