"""What int8 products (Policy.int8_matmul) cost in accuracy: logits, greedy agreement and F1 against float32.

For each model, the engine runs the same prompts twice in one process, once computing in float32 and once
with int8 products (same stored weights otherwise, same batching):

  * logits: last-position logits of the first --logit-rows prompts of each dataset, relative error
    ||int8 - fp32|| / ||fp32||, the largest absolute difference, and how often the top token agrees;
  * greedy agreement: 4 chat prompts x 16 new tokens, the tokens identical or not (the equivalence
    test's prompts), and on the wrangling prompts the answer text identical or not;
  * F1: entity matching at k = 3 on the first --limit test pairs of Beer, Fodors-Zagats and Walmart-Amazon.

    .venv/bin/python benchmarks/int8_accuracy.py [--models smollm2-135m qwen2.5-coder-1.5b] [--write-doc]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._doc import engine_commit, load_now, publish  # noqa: E402

SECTION = "int8_accuracy"
DATASETS = ("Beer", "Fodors-Zagats", "Walmart-Amazon")
CHAT = ["What is the capital of France?", "Write a Python function that reverses a string.",
        "Are 'Apple iPhone 12 64GB' and 'iPhone 12 (64 GB) by Apple' the same product? Answer Yes or No.",
        "List three colours."]


def measure(model: str, limit: int, logit_rows: int) -> list[dict]:
    import torch

    from benchmarks.wrangling_vs_llamacpp import build_prompts
    from engine import LLM, Policy
    from wrangling_tasks import get_task

    task = get_task("entity-matching")
    llms = {name: LLM.from_pretrained(model, policy=Policy(int8_matmul=name == "int8"), progress=False)
            for name in ("fp32", "int8")}
    tok = llms["fp32"].tokenizer
    chat = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
            for c in CHAT]
    chat = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chat]     # (a BatchEncoding in transformers 5)
    greedy = {name: llm.generate(chat, max_new_tokens=16, ignore_eos=True) for name, llm in llms.items()}
    rows = [dict(model=model, dataset="4 chat prompts x 16 tokens", chat_same=sum(
        a == b for a, b in zip(greedy["fp32"], greedy["int8"])), chat_n=len(chat))]
    for dataset in DATASETS:
        prompts, labels, _ = build_prompts(dataset, 3, limit)
        ids = [tok(p)["input_ids"] for p in prompts[:logit_rows]]
        logits = {name: llm.logits(ids).float() for name, llm in llms.items()}
        diff = logits["int8"] - logits["fp32"]
        answers = {name: [] for name in llms}
        for name, llm in llms.items():
            for i in range(0, len(prompts), 64):
                answers[name] += llm.generate_text(prompts[i: i + 64], max_new_tokens=3, stop="\n")
        f1 = {name: task.score([task.parse(a) for a in ans], labels)["f1"] for name, ans in answers.items()}
        rows.append(dict(model=model, dataset=dataset, n=len(prompts),
                         rel=float(diff.norm() / logits["fp32"].norm()), max_abs=float(diff.abs().max()),
                         top1=int((logits["int8"].argmax(-1) == logits["fp32"].argmax(-1)).sum()),
                         logit_n=len(ids), same=sum(a == b for a, b in zip(answers["fp32"], answers["int8"])),
                         f1_fp32=f1["fp32"], f1_int8=f1["int8"]))
        print(rows[-1], flush=True)
        del logits, diff
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for llm in llms.values():
        llm.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--limit", type=int, default=91, help="test pairs per dataset (default: %(default)s)")
    ap.add_argument("--logit-rows", type=int, default=8, help="prompts per dataset whose logits are compared")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)

    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    rows = [r for model in args.models for r in measure(model, args.limit, args.logit_rows)]
    lines = ["### What int8 products cost in accuracy (`benchmarks/int8_accuracy.py`)", "",
             "The engine with `Policy(int8_matmul=True)` against the same engine in float32, same process, same "
             f"prompts (k = 3, the first {args.limit} test pairs). Logits: last position of the first "
             f"{args.logit_rows} prompts of each dataset. Run {started}, engine at commit {commit}; load average "
             f"at the end: {load_now()}. Command: `.venv/bin/python benchmarks/int8_accuracy.py`.", "",
             "| model | prompts | logits rel. error | max abs error | top-1 same | answers same | F1 float32 | F1 int8 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "chat_same" in r:
            lines.append(f"| {r['model']} | {r['dataset']} | | | | {r['chat_same']}/{r['chat_n']} (token for token) | | |")
        else:
            lines.append(f"| {r['model']} | {r['dataset']} | {r['rel']:.4f} | {r['max_abs']:.3f} | "
                         f"{r['top1']}/{r['logit_n']} | {r['same']}/{r['n']} | {100 * r['f1_fp32']:.1f} | "
                         f"{100 * r['f1_int8']:.1f} |")
    publish(SECTION, "\n".join(lines) + "\n", args.write_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
