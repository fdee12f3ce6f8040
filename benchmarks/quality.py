"""Quality of the embedded models on every benchmark dataset -> docs/quality.md.

For each model x dataset x k: F1 (matching, detection) or accuracy (imputation), beside a
majority-class baseline and the paper's GPT-3 175B numbers, with rows/s. Then prompt variants on
the entity-matching sets (chat template, choice scoring) for the models asked with --variants.

Every finished run is appended to a JSON-lines file (--results), so a long run that is cut can be
continued with --resume; the doc is written from everything in that file.

    .venv/bin/python benchmarks/quality.py                       # all models, all datasets, k = 0 and 3 (~1 h)
    .venv/bin/python benchmarks/quality.py --models qwen2.5-coder-1.5b --datasets Beer --limit 50
    .venv/bin/python benchmarks/quality.py --resume              # skip runs already in the results file
    .venv/bin/python benchmarks/quality.py --write-only          # re-render docs/quality.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._doc import engine_commit, machine_line  # noqa: E402

MODELS = ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"]   # the default first
LABELS = {"smollm2-135m": "SmolLM2-135M", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B",
          "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B"}

# "Can Foundation Models Wrangle Your Data?" (Narayan et al., VLDB 2023), GPT-3 175B, zero-shot -> 10 demos,
# as recorded in shared/REFERENCE.md (from memory of the paper; to be checked against arXiv 2205.09911).
PAPER = {
    "Fodors-Zagats": (87.2, 100), "Beer": (78.6, 100), "iTunes-Amazon": (65.9, 98.2),
    "Walmart-Amazon": (60.6, 87.0), "DBLP-ACM": (93.5, 96.6), "Amazon-Google": (54.3, 63.5),
    "Hospital": (6.9, 97.8), "Restaurant": (70.9, 88.4), "Buy": (84.6, 98.5),
}

# Prompt variants tried on the entity-matching sets at k = 3 (the default, plain few-shot greedy, is
# the main table's k = 3 run), and more demonstrations for error detection.
VARIANTS = {
    "chat": dict(generate_kwargs={"chat": True}),            # the few-shot text inside the chat template
    "choice": dict(use_choice_scoring=True),                 # Yes/No by log-probability, one pass
}
VARIANT_DATASETS = ["Beer", "Fodors-Zagats", "Walmart-Amazon"]
MORE_DEMOS = {"Hospital": 10, "beers": 10}                  # dataset -> k, plain prompts, variant "more-demos"
ERROR_SHARE = 0.25                          # of the error-detection sample (see enriched_cells)
READING = "## Reading"                      # from this heading on, docs/quality.md is written by hand


def majority_score(task: str, labels: list) -> float:
    """The score of always answering the most frequent label of the evaluated rows."""
    labels = [x for x in labels if x is not None]
    if not labels:
        return float("nan")
    top, count = Counter(labels).most_common(1)[0]
    if task == "imputation":
        return count / len(labels)
    if top is True:                      # answering "yes" everywhere
        return all_yes_f1(count, len(labels))
    return 0.0                           # answering "no" everywhere finds nothing: F1 = 0


def enriched_cells(inputs, info, limit: int, seed: int = 0):
    """The test cells to check for error detection: a seeded sample of `limit` cells, a quarter of them
    errors. The first cells of these tables hold almost no errors (Hospital: 1 in its first 50, beers:
    none), which leaves F1 undefined; a sample with errors in it measures whether the model finds them."""
    import dataclasses

    import pandas as pd

    from wrangling_tasks import get_task

    mod = get_task("error-detection")
    items = mod.make_items(inputs, inputs.spec or info.spec)
    errors, clean = items[items["label"] == True], items[items["label"] == False]   # noqa: E712 (nullable)
    n_err = min(len(errors), round(limit * ERROR_SHARE))
    pick = pd.concat([errors.sample(n_err, random_state=seed), clean.sample(limit - n_err, random_state=seed)])
    cells = pick.sample(frac=1, random_state=seed)[list(mod.keys_for(inputs))].reset_index(drop=True)
    return dataclasses.replace(inputs, cells=cells)


def all_yes_f1(positives: int, n: int) -> float:
    """F1 of answering Yes to all n rows, `positives` of them true: precision p = positives / n, recall 1."""
    p = positives / n if n else 0.0
    return 2 * p / (1 + p) if p else 0.0


def run_one(llm, model: str, name: str, info, k: int, limit: int, batch_size: int, variant: str,
            commit: str) -> dict:
    import pandas as pd

    from wrangling_tasks import load_benchmark, run

    inputs = load_benchmark(info.task, name, "test")
    if info.task == "error-detection":
        inputs = enriched_cells(inputs, info, limit)
    if variant in VARIANTS:
        kwargs = VARIANTS[variant]
    elif variant:                            # "more-demos": the plain few-shot text with a larger k
        kwargs = {}
    else:
        # k = 0: an instruct model answers through its chat template; with demonstrations the few-shot
        # text itself shows the format (the paper's setup)
        kwargs = dict(generate_kwargs={"chat": True} if k == 0 else None)
    t0 = time.perf_counter()
    res = run(info.task, inputs, llm, k=k, limit=limit, batch_size=batch_size, progress=False, **kwargs)
    m = res.metrics or {}
    metric = "accuracy" if info.task == "imputation" else "f1"
    labels = [None if pd.isna(x) else x for x in res.predictions["label"].tolist()]
    answers = res.predictions["answer"].tolist()
    return dict(model=model, dataset=name, task=info.task, k=k, variant=variant, n=len(res.predictions),
                metric=metric, score=m.get(metric, float("nan")), unanswered=m.get("unanswered", 0),
                yes=sum(a is True for a in answers), positives=sum(x is True for x in labels),
                majority=majority_score(info.task, labels), rows_per_s=res.rows_per_s, demos=res.n_demos,
                seconds=time.perf_counter() - t0, limit=limit, commit=commit,
                finished=time.strftime("%Y-%m-%d %H:%M"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--limit", type=int, default=50, help="first N test rows of each dataset (default: %(default)s)")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--datasets", nargs="*", help="default: all")
    ap.add_argument("--variants", nargs="*", default=["qwen2.5-coder-1.5b"], metavar="MODEL",
                    help="models to try the prompt variants on (default: %(default)s; none: --variants)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "quality.jsonl"))
    ap.add_argument("--resume", action="store_true", help="skip runs already in --results")
    ap.add_argument("--write-only", action="store_true", help="only render the doc from --results")
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality.md"))
    args = ap.parse_args(argv)

    results = Path(args.results)
    if not args.write_only:
        measure(args, results)
    write(load(results), args, results)
    return 0


def load(results: Path) -> list[dict]:
    """The last run of each (model, dataset, k, variant) in the results file."""
    rows: dict[tuple, dict] = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[_key(r)] = r
    return list(rows.values())


def _key(r: dict) -> tuple:
    """What one run measures: a later run of the same key replaces it."""
    return r["model"], r["dataset"], r["k"], r["variant"]


def measure(args, results: Path) -> None:
    from engine import LLM, Policy
    from wrangling_tasks import DATA

    done = {_key(r) for r in load(results)} if args.resume else set()
    commit = engine_commit()
    results.parent.mkdir(parents=True, exist_ok=True)
    datasets = {n: i for n, i in DATA.items() if not args.datasets or n in args.datasets}
    for model in args.models:
        plan = [(n, k, "") for n in datasets for k in args.ks]
        if model in (args.variants or []):
            plan += [(n, 3, v) for n in VARIANT_DATASETS if n in datasets for v in VARIANTS]
            plan += [(n, k, "more-demos") for n, k in MORE_DEMOS.items() if n in datasets]
        plan = [p for p in plan if (model, *p) not in done]
        if not plan:
            continue
        llm = LLM.from_pretrained(model, policy=Policy(gpu_batch_size=16), progress=False)
        for name, k, variant in plan:
            r = run_one(llm, model, name, datasets[name], k, args.limit, args.batch_size, variant, commit)
            with open(results, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{model:20s} {name:16s} k={k} {variant or 'plain':6s} n={r['n']:4d} {r['metric']} "
                  f"{r['score']:.3f} (majority {r['majority']:.3f}) yes {r['yes']}/{r['positives']} true, "
                  f"unanswered {r['unanswered']}, {r['rows_per_s']:.2f} rows/s", flush=True)
        llm.close()
        del llm


def _pct(x) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def write(rows: list[dict], args, results: Path) -> None:
    if not rows:
        print("no results to write")
        return
    models = [m for m in MODELS if any(r["model"] == m for r in rows)] + \
        sorted({r["model"] for r in rows} - set(MODELS))
    ks = sorted({r["k"] for r in rows if not r["variant"]})
    plain = {(r["model"], r["dataset"], r["k"]): r for r in rows if not r["variant"]}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows if not r["variant"]))
    commits = sorted({r["commit"] for r in rows})
    limits = sorted({r["limit"] for r in rows})
    when = sorted(r["finished"] for r in rows)
    lines = [
        "# Quality on the wrangling benchmarks",
        "",
        "Written by `benchmarks/quality.py` from `benchmarks/results/quality.jsonl`. Greedy decoding, newline "
        f"stop, the project's own prompts; first {', '.join(map(str, limits))} test rows of each dataset (all rows "
        "where the split is smaller; for error detection a seeded sample of that many cells, "
        f"{ERROR_SHARE:.0%} of them errors, because the first cells hold almost none). Scores in percent: F1 "
        "(the true harmonic mean) for entity matching and error detection, accuracy for imputation. "
        "*Majority* answers the most frequent label of the evaluated rows everywhere (No, F1 0, on every Yes/No "
        "set here); *all Yes* answers Yes everywhere: a model that says Yes to almost every pair scores about "
        "that and has learned nothing. *GPT-3* is the paper's 175B model (zero-shot / 10 demonstrations) as "
        "recorded in shared/REFERENCE.md: the paper's numbers, not measured here. At k = 0 the instruct models "
        "answer through "
        "their chat template; at k = 3 the few-shot text is the prompt (the paper's format).",
        "",
        f"{machine_line()}. Runs {when[0]} to {when[-1]}, engine at {', '.join(commits)}. "
        f"Command: `.venv/bin/python benchmarks/quality.py --limit {', '.join(map(str, limits))}` (`make quality`; "
        "`--resume` continues a cut run).",
        "",
        "Models: " + "; ".join(f"`{m}` ({_about(m)})" for m in models) + ".",
        "",
        "## Scores",
        "",
        "| dataset | task | rows | majority | all Yes | GPT-3 k=0 / k=10 | "
        + " | ".join(f"{LABELS.get(m, m)} k={k}" for m in models for k in ks) + " |",
        "|---|---|---:|---:|---:|---|" + "---:|" * (len(models) * len(ks)),
    ]
    for d in datasets:
        any_row = next(r for (m, dd, k), r in plain.items() if dd == d)
        paper = PAPER.get(d)
        cells = [_pct(plain[(m, d, k)]["score"]) if (m, d, k) in plain else "" for m in models for k in ks]
        all_yes = "—" if any_row["task"] == "imputation" else _pct(all_yes_f1(any_row["positives"], any_row["n"]))
        lines.append(f"| {d} | {any_row['task']} | {any_row['n']} | {_pct(any_row['majority'])} | {all_yes} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '—'} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed and answer counts", "",
              "Rows/s of the whole run (prompt building, prefill with the shared prefix computed once, decoding). "
              "*Yes* counts the rows answered Yes (or, for imputation, nothing) against the true positives; "
              "*unanswered* is output that parsed to no answer.", "",
              "| model | dataset | k | rows | score | Yes / true | unanswered | rows/s |",
              "|---|---|---:|---:|---:|---|---:|---:|"]
    for m in models:
        for d in datasets:
            for k in ks:
                r = plain.get((m, d, k))
                if r:
                    yes = f"{r['yes']} / {r['positives']}" if r["task"] != "imputation" else "—"
                    lines.append(f"| {LABELS.get(m, m)} | {d} | {k} | {r['n']} | {_pct(r['score'])} | {yes} | "
                                 f"{r['unanswered']} | {r['rows_per_s']:.2f} |")
    variants = [r for r in rows if r["variant"] in VARIANTS]
    if variants:
        lines += ["", "## Prompt variants (entity matching, k = 3)", "",
                  "*plain* is the paper's few-shot text answered greedily (the main table); *chat* wraps the same "
                  "text in the model's chat template; *choice* answers Yes or No by comparing the two answers' "
                  "log-probabilities after one prefill, so it never leaves a row unanswered.", "",
                  "| model | dataset | plain F1 | chat F1 | choice F1 | plain rows/s | chat rows/s | choice rows/s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        by = {(r["model"], r["dataset"], r["variant"]): r for r in variants}
        for m in models:
            for d in VARIANT_DATASETS:
                if not any((m, d, v) in by for v in VARIANTS):
                    continue
                runs = [plain.get((m, d, 3))] + [by.get((m, d, v)) for v in VARIANTS]
                lines.append(f"| {LABELS.get(m, m)} | {d} | " + " | ".join(_pct(r["score"]) if r else "" for r in runs)
                             + " | " + " | ".join(f"{r['rows_per_s']:.2f}" if r else "" for r in runs) + " |")
    more = [r for r in rows if r["variant"] == "more-demos"]
    if more:
        lines += ["", "## More demonstrations (error detection)", "",
                  "| model | dataset | k | rows | F1 | Yes / true | rows/s | F1 at k = 3 |",
                  "|---|---|---:|---:|---:|---|---:|---:|"]
        for r in more:
            k3 = plain.get((r["model"], r["dataset"], 3))
            lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['dataset']} | {r['k']} | {r['n']} | "
                         f"{_pct(r['score'])} | {r['yes']} / {r['positives']} | {r['rows_per_s']:.2f} | "
                         f"{_pct(k3['score']) if k3 else ''} |")
    out = Path(args.out)
    old = out.read_text() if out.is_file() else ""
    if READING in old:                      # the hand-written reading of the numbers survives a rewrite
        lines += ["", old[old.index(READING):].strip()]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} from {len(rows)} runs in {results}")


def _about(model: str) -> str:
    from engine.registry import embedded_model
    m = embedded_model(model)
    return m.about.split(":")[0] if m else model


if __name__ == "__main__":
    raise SystemExit(main())
