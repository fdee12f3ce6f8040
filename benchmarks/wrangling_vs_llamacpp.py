"""Rows/s, F1 and peak RSS: the engine against llama.cpp on the same GGUF and the same prompts.

Entity matching at k demonstrations on each dataset's test pairs; each system runs in a fresh
process per round (its own peak RSS), rounds alternate the order of the systems, and the table
reports the median rows/s (model load excluded for all) with every round listed. Systems: the
engine in float32 (--policy) and with int8 products (the same policy plus `int8_matmul`), and
llama.cpp on the file's own quantization and requantized to Q4_0 (its fastest CPU format).

With --quantized the engine rows are its stored precisions instead, each computed in float32 and
with int8 products: fp16 weights and cache, and 4-bit weights and 4-bit cache (`compress_weight`,
`compress_cache`; with int8 products the 4-bit matrices are made int8 rows as each block loads them),
beside llama.cpp Q4_0.

    .venv/bin/python benchmarks/wrangling_throughput.py --vs-llamacpp [--model qwen2.5-coder-1.5b]
        [--datasets Beer Fodors-Zagats] [--k 3] [--rounds 3] [--llama-python PATH] [--write-doc]

llama.cpp comes from llama-cpp-python, never a project dependency: build it once in a throwaway
virtualenv (`python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python`, about
20 minutes on 2 cores) and pass its python with --llama-python (or $LLAMA_CPP_PYTHON). Without one the
llama.cpp rows are skipped with a note.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._doc import engine_commit, load_now, publish
from benchmarks._harness import PY, gib, run_json

SECTION = "wrangling_vs_llamacpp"
QUANTIZED_SECTION = "quantized_throughput"
FOUR_BIT = {"compress_weight": True, "compress_cache": True}


def llama_python(explicit: str | None) -> str | None:
    """A python that can import llama_cpp: the one given, $LLAMA_CPP_PYTHON, or this one."""
    for candidate in (explicit, os.environ.get("LLAMA_CPP_PYTHON"), PY):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            ok = subprocess.run([candidate, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return candidate
    return None


def build_prompts(dataset: str, k: int, limit: int | None) -> tuple[list[str], list, int]:
    """The flows' own prompts for the test pairs: (prompts, labels, shared prefix characters)."""
    import pandas as pd

    from wrangling_tasks import load_benchmark, prepare

    prep = prepare("entity-matching", load_benchmark("entity-matching", dataset, "test"), None, k=k, limit=limit)
    labels = [None if pd.isna(x) else bool(x) for x in prep.items["label"]]   # numpy bools -> bool
    return list(prep.items["prompt"]), labels, len(prep.prefix)


def _command(args) -> str:
    """The command line that reproduces this run (the options that change what it measures)."""
    datasets = "" if args.datasets == ["Beer", "Fodors-Zagats"] else " --datasets " + " ".join(args.datasets)
    return (".venv/bin/python benchmarks/wrangling_throughput.py --vs-llamacpp"
            f"{' --quantized' if args.quantized else ''} --model {args.model}{datasets} --rounds {args.rounds}"
            f"{' --limit ' + str(args.limit) if args.limit else ''}"
            f"{' --policy ' + repr(args.policy) if args.policy != '{}' else ''}")


def main(args) -> int:
    from engine.registry import DEFAULT_MODEL, embedded_model, models_dir, resolve_model
    from wrangling_tasks import get_task

    model = embedded_model(args.model)
    if model is None:
        raise SystemExit(f"--vs-llamacpp needs an embedded GGUF model name, got {args.model!r}")
    gguf = models_dir() / model.file
    resolve_model(args.model)                       # convert once, outside the timed runs
    peer = llama_python(args.llama_python)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = get_task("entity-matching")
    started, commit = time.strftime("%Y-%m-%d %H:%M"), engine_commit()
    base = json.loads(args.policy)
    engine = lambda **fields: lambda pf, out: [PY, "benchmarks/_engine_answer.py", "--model", args.model,
                                               "--prompts", str(pf), "--json", str(out),
                                               "--policy", json.dumps({**base, **fields})]
    systems = {"engine": engine(), "engine int8": engine(int8_matmul=True)}
    if args.quantized:
        systems.update({"engine 4-bit": engine(**FOUR_BIT), "engine 4-bit int8": engine(**FOUR_BIT, int8_matmul=True)})
    own = re.search(r"(?i)(q\d_[a-z0-9_]*[a-z0-9]|bf16|f16|f32)(?=\.gguf$)", model.file)
    own = own.group(1).upper() if own else "own type"                        # e.g. Q4_K_M
    peers = [("llama.cpp Q4_0", ["--requantize", "Q4_0"])]
    for label, extra in peers if args.quantized else [(f"llama.cpp {own}", [])] + peers:
        if peer:
            systems[label] = lambda pf, out, extra=extra: [peer, "benchmarks/_llamacpp_answer.py", "--gguf", str(gguf),
                                                           "--prompts", str(pf), "--json", str(out), *extra]
    sections, version = [], ""
    for dataset in args.datasets:
        prompts, labels, prefix_chars = build_prompts(dataset, args.k, args.limit)
        pf = work / f"{dataset}.prompts.json"
        pf.write_text(json.dumps(prompts))
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for r in range(args.rounds):
            order = list(systems) if r % 2 == 0 else list(reversed(systems))
            for system in order:
                out = work / f"{dataset}.{system}.{r}.json"
                res = run_json(systems[system](pf, out), out, log=work / f"{dataset}.{system}.{r}.log")
                if "result" not in res:
                    raise SystemExit(f"{system} on {dataset} failed: {res.get('error')} (log {res['log']})")
                got = res["result"]
                version = got.get("version", version)
                f1 = task.score([task.parse(a) for a in got["answers"]], labels)["f1"]
                runs[system].append(dict(rows_per_s=len(prompts) / got["seconds"], f1=f1, load_s=got["load_s"],
                                         peak=res["peak_rss_bytes"], answers=got["answers"],
                                         yes=sum(task.parse(a) is True for a in got["answers"])))
                print(f"{dataset} round {r + 1}: {system}: {runs[system][-1]['rows_per_s']:.2f} rows/s, "
                      f"F1 {f1:.3f}, peak RSS {gib(res['peak_rss_bytes'])} GiB", flush=True)
        sections.append(_table(dataset, len(prompts), sum(x is True for x in labels), prefix_chars, runs,
                               "engine" if args.quantized else None))
    note = "" if peer else ("\n\nllama.cpp rows skipped: no python with llama_cpp was found (pass --llama-python "
                            "or set LLAMA_CPP_PYTHON; see the script's docstring to build one).")
    if args.quantized:
        md = "\n".join([
            f"### The engine's stored precisions on entity matching with `{args.model}`", "",
            f"`{model.file}`; the engine converts it once to float32 safetensors. `engine`: weights and KV cache "
            "stored in float16, computed in float32 (Policy " + args.policy + "); `engine 4-bit`: weights and KV "
            "cache stored 4-bit group-wise (`compress_weight`, `compress_cache`), computed in float32: a prefill "
            "dequantizes each layer, decode steps of few rows multiply the 4-bit values directly; `int8`: the "
            "decoder layers' products in int8 (`int8_matmul`; with 4-bit weights a prefill makes each layer's int8 "
            "rows from the 4-bit ones as it loads them, and decode steps multiply the 4-bit values). llama.cpp "
            f"Q4_0 {('(llama-cpp-python ' + version + ') ') if version else ''}is the reference. The project's "
            f"own k = {args.k} prompts, greedy, newline stop, at most 3 new tokens; model load excluded; a "
            "fresh process per system and round, rounds alternating the order. "
            f"Run {started}, engine at commit {commit}; load average at the end: {load_now()}. Command: "
            f"`{_command(args)}`." + note, "", *sections])
        # one section per model and policy: the default model's at the default policy keeps the plain name
        name = QUANTIZED_SECTION if args.model == DEFAULT_MODEL else f"{QUANTIZED_SECTION}_{args.model}"
        publish(name + ("" if args.policy == "{}" else "_" + re.sub(r"\W+", "", args.policy)[:40]), md, args.write_doc)
        return 0
    md = "\n".join([
        f"### Entity matching with `{args.model}`: the engine vs llama.cpp on the same GGUF", "",
        f"`{model.file}` ({model.about.split(':')[0]}); the engine converts it once to float32 safetensors and "
        f"stores weights in float16 (Policy {args.policy}), computing in float32; `engine int8` holds the decoder "
        "layers' weights as int8 rows and multiplies them by int8-quantized activations (`Policy.int8_matmul`); "
        f"llama.cpp {('(llama-cpp-python ' + version + ') ') if version else ''}multiplies its packed quantized "
        "blocks by 8-bit-quantized activations, on the file's own types and requantized to Q4_0 by its own "
        f"quantizer. The project's own k = {args.k} prompts, greedy, newline stop, at most 3 new tokens; "
        "model load excluded. Each system runs in a fresh process per round; rounds alternate the order. "
        f"Run {started}, engine at commit {commit}; load average at the end: {load_now()}. "
        f"Command: `{_command(args)}`." + note, "",
        *sections])
    # one section per model: the default model's keeps the plain name
    publish(SECTION if args.model == DEFAULT_MODEL else f"{SECTION}_{args.model}", md, args.write_doc)
    return 0


def _table(dataset: str, n: int, positives: int, prefix_chars: int, runs: dict[str, list[dict]],
           against: str | None = None) -> str:
    """The dataset's rows; `against`: also each engine system's speed relative to that system."""
    lines = [f"#### {dataset} (test, {n} pairs, {positives} true matches; shared prefix {prefix_chars} characters)",
             "", "| system | rows/s (median) | rounds | F1 | Yes answers | peak RSS | load s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    med = {}
    for system, rs in runs.items():
        med[system] = statistics.median(r["rows_per_s"] for r in rs)
        rounds = ", ".join(f"{r['rows_per_s']:.2f}" for r in rs)
        same = all(r["answers"] == rs[0]["answers"] for r in rs)
        lines.append(f"| {system} | {med[system]:.2f} | {rounds} | "
                     f"{100 * rs[0]['f1']:.1f}{'' if same else ' (answers differ between rounds)'} | "
                     f"{rs[0]['yes']} | {gib(max(r['peak'] for r in rs))} GiB | "
                     f"{statistics.median(r['load_s'] for r in rs):.1f} |")
    peers = [s for s in med if s.startswith("llama.cpp")]
    if peers:
        best = max(peers, key=med.get)
        lines += ["", f"Against llama.cpp's fastest here ({best}, {med[best]:.2f} rows/s): "
                  + "; ".join(f"{s} **{med[s] / med[best]:.2f}×**" for s in med if s.startswith("engine")) + "."]
    if against:
        lines += ["", f"Against `{against}` ({med[against]:.2f} rows/s): "
                  + "; ".join(f"{s} **{med[s] / med[against]:.2f}×**" for s in med if s != against) + "."]
    if "engine int8" in runs:
        same = sum(a == b for a, b in zip(runs["engine"][0]["answers"], runs["engine int8"][0]["answers"]))
        lines += ["", f"`engine int8` gives the float32 engine's answer text on {same} of {n} pairs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit("run it as: .venv/bin/python benchmarks/wrangling_throughput.py --vs-llamacpp")
