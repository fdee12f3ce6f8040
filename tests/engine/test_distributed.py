"""Pipeline parallelism gives the single-process tokens: 2 (and 3) ranks over gloo on 127.0.0.1.

The tests launch this file under torchrun (`python -m torch.distributed.run`); run that way it
is the driver: every rank builds a PipelineLLM, runs CASES and writes what it got as JSON.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# 12 prompts sharing a 4-token prefix (reused in pipeline mode too), mixed lengths
SHARED = [[1, 30, 31, 32] + p[1:] for p in
          [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16, 17, 18], [1, 3],
           [1, 40, 41, 42], [1, 50, 51, 52, 53, 54]] * 2]
MIXED = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16, 17, 18], [1, 3], [1, 40, 41, 42],
         [1, 50, 51, 52, 53, 54], [1, 60, 61], [4, 70, 71, 72, 73, 74, 75]]

TEXTS = ["hello world", "ab", "the quick brown fox"]
POLICIES = {
    "all in memory, 2x3": dict(gpu_batch_size=2, num_gpu_batches=3),
    "weights cpu/disk, cache on three tiers, overlap, 2x2": dict(
        gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=50,
        cache_gpu_percent=34, cache_cpu_percent=33, overlap=True),
}
# (prompts, generate options): several blocks in flight; one block split into groups; early stops
CASES = {
    "shared prefix, stop ids": (SHARED, dict(max_new_tokens=8, stop=[5, 99])),
    "no prefix reuse, ignore eos": (SHARED, dict(max_new_tokens=8, ignore_eos=True, share_prefix=False)),
    "one block, unsorted": (MIXED[:6], dict(max_new_tokens=6, ignore_eos=True, bucket=False)),
    "eight mixed, one token": (MIXED, dict(max_new_tokens=1)),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def single_process(path, policy: dict, cases=CASES) -> dict:
    from engine import LLM, Policy
    llm = LLM.from_pretrained(path, policy=Policy(**policy), offload_dir=path.parent / "offload-ref",
                              progress=False)
    try:
        return {name: llm.generate(prompts, **opts) for name, (prompts, opts) in cases.items()}
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny_opt_4(tmp_path_factory):
    from enginekit import _save_opt
    path = tmp_path_factory.mktemp("opt-tiny-4")
    _save_opt(path, num_hidden_layers=4)
    return path


def run_driver(tmp_path, checkpoint, nproc: int, policies: list[str]) -> list[dict]:
    out = tmp_path / "out"
    proc = torchrun(nproc, str(Path(__file__)), "--checkpoint", str(checkpoint), "--out", str(out),
                    "--offload-dir", str(tmp_path / "offload"), *policies)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_ranks_give_the_single_process_tokens_for_two_policies(tiny_opt, tmp_path):
    ranks = run_driver(tmp_path, tiny_opt[0], 2, list(POLICIES))
    for name, policy in POLICIES.items():
        reference = single_process(tiny_opt[0], policy)
        for r, got in enumerate(ranks):
            assert got["results"][name] == reference, f"rank {r}, policy {name!r}"
    first = ranks[0]
    assert first["stage"] == [0, 2] and ranks[1]["stage"] == [1, 2]
    # several groups were in flight and the shared prefix was reused
    stats = first["stats"]["all in memory, 2x3"]["shared prefix, stop ids"]
    assert stats["prefix_len"] == 4 and stats["turns"] > 8
    assert all(x["busy_s"] > 0 for x in stats["ranks"])
    # stop ids cut some sequences early, identically on both ranks
    assert any(len(t) < 8 for t in first["results"]["all in memory, 2x3"]["shared prefix, stop ids"])
    # the second policy really offloaded: rank 1 held weights on disk, and removed its files
    assert ranks[1]["weight_bytes"]["weights cpu/disk, cache on three tiers, overlap, 2x2"]["disk"] > 0
    assert not any((tmp_path / "offload").iterdir())
    # generate_text: prompts on rank 0, the single-process texts on every rank
    from engine import LLM, Policy
    llm = LLM.from_pretrained(tiny_opt[0], policy=Policy(**POLICIES["all in memory, 2x3"]), progress=False)
    want = llm.generate_text(TEXTS, max_new_tokens=6, stop="e")
    assert ranks[0]["text"] == ranks[1]["text"] == want
    # a bad call on rank 0 raises on every rank (no rank is left waiting)
    assert ranks[0]["bad_call"].startswith("ValueError")
    assert ranks[1]["bad_call"].startswith("PipelineError: rank 0 rejected the call: ValueError")
    assert ranks[0]["bad_text"].startswith("TypeError") and ranks[1]["bad_text"].startswith("PipelineError")


@pytest.mark.slow
def test_three_ranks_with_a_middle_stage(tiny_opt_4, tmp_path):
    name = "weights cpu/disk, cache on three tiers, overlap, 2x2"
    ranks = run_driver(tmp_path, tiny_opt_4, 3, [name])
    reference = single_process(tiny_opt_4, POLICIES[name])
    assert [r["stage"] for r in ranks] == [[0, 3], [1, 3], [2, 3]]
    for got in ranks:
        assert got["results"][name] == reference


@pytest.mark.slow
def test_bench_under_torchrun_reports_from_rank_zero(tiny_opt, tmp_path):
    out = tmp_path / "bench.json"
    proc = torchrun(2, "-m", "engine.bench", "--model", str(tiny_opt[0]), "--prompt-len", "16",
                    "--gen-len", "4", "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--no-progress",
                    "--offload-dir", str(tmp_path / "offload"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("total:") == 1 and "pipeline: 2 stages" in proc.stdout
    r = json.loads(out.read_text())
    assert r["block_size"] == 8 and r["pipeline"]["world_size"] == 2      # two blocks of 2x2 in flight
    assert r["total_tokens_per_s"] > 0


# ---- the driver (one process per rank, under torchrun) --------------------------------------------
def main(argv=None) -> int:
    import argparse

    import torch

    from engine import Policy
    from engine.distributed import PipelineLLM

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--offload-dir", required=True)
    p.add_argument("policies", nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report: dict = {"results": {}, "stats": {}, "weight_bytes": {}}
    for name in args.policies:
        pipe = PipelineLLM.from_pretrained(args.checkpoint, policy=Policy(**POLICIES[name]),
                                           offload_dir=args.offload_dir, progress=False)
        report["stage"] = list(pipe.llm.stage)
        report["weight_bytes"][name] = pipe.weight_bytes()
        report["results"][name], report["stats"][name] = {}, {}
        for case, (prompts, opts) in CASES.items():
            report["results"][name][case] = pipe.generate(prompts if pipe.rank == 0 else None, **opts)
            report["stats"][name][case] = pipe.last_stats
        if "text" not in report:                      # text in on rank 0, the same text out everywhere
            report["text"] = pipe.generate_text(TEXTS if pipe.rank == 0 else None, max_new_tokens=6, stop="e")
        if "bad_call" not in report:
            try:
                pipe.generate([[1, 2], []] if pipe.rank == 0 else None, max_new_tokens=2)
            except Exception as exc:
                report["bad_call"] = f"{type(exc).__name__}: {exc}"
            try:                                      # rank 0 fails while encoding: every rank raises
                pipe.generate_text("not a list" if pipe.rank == 0 else None, max_new_tokens=2)
            except Exception as exc:
                report["bad_text"] = f"{type(exc).__name__}: {exc}"
        pipe.llm.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{pipe.rank}.json").write_text(json.dumps(report, default=str))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
