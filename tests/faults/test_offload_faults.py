"""Faults in the offload folder: a disk too small (a real 1 MiB tmpfs), an offload file cut short under the
engine, and an engine process killed with SIGKILL, mid-run or while creating a file.

Offload files are unlinked once open (engine/disk.py), so bytes on disk can only change under the engine
through its own descriptors (or root's /proc/<pid>/fd): a file cut short is a clear error at the next read;
bytes changed in place are read as they are (nothing checksums them: that would cost a pass over every
byte of every layer at every step).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, MemoryBudgetError, Policy
from engine.tiers import Tiers

ROOT = Path(__file__).resolve().parents[2]
ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0)                        # every weight in offload files


@pytest.fixture(scope="module")
def opt_1mib(tmp_path_factory):
    """A tiny OPT whose float16 weights take 1.2 MiB: more than the small disk below holds."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("opt-1mib")
    OPTForCausalLM(OPTConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=64)).save_pretrained(path)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, or the right to mount)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# The engine writes no rows: every scenario here reports 0 rows lost and 0 duplicates.
ENOSPC = "ENOSPC in the offload folder (1 MiB tmpfs)"
ENOSPC_NOTE = ("no rows (engine level); fails as the file is created, before the weights or the block that need it "
               "are used, naming the folder and the bytes (or the disk tier's budget); the disk is left as it was; "
               "could not hold")
KILLED = "SIGKILLed engine leaves no offload files"
KILLED_NOTE = ("no rows (engine level); offload files are unlinked once open, and the next start removes a dead "
               "process's folder; killed")


# ---- a disk too small ---------------------------------------------------------------------------------

def test_a_file_the_disk_cannot_hold_fails_at_creation_naming_the_folder_and_the_bytes(small_disk, fault_report):
    tiers, free = Tiers(small_disk, disk_mem="1GB"), free_bytes(small_disk)      # a disk_mem the disk lacks
    with pytest.raises(OSError, match=f"no space left in the offload folder {small_disk}: the offload file "
                                      r"\d+-layer0.weights.bin needs 2097152 bytes \(2.00 MiB\) and 1.00 MiB "
                                      "are free there") as e:
        tiers.new_file("layer0.weights", 4096, 512)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(small_disk) == [] and free_bytes(small_disk) == free and tiers.trackers["disk"].current == 0
    fault_report(ENOSPC, trials=1, faults=1, rows_lost=0, duplicates=0, outcome="clear error", note=ENOSPC_NOTE,
                 counts={"a file": 1})


def test_a_file_reserves_on_disk_exactly_what_the_disk_tier_counts(small_disk):
    tiers, free = Tiers(small_disk), free_bytes(small_disk)
    f = tiers.new_file("cache", 5000, 16)                                    # rows of 5000 bytes at 8 KiB strides
    assert tiers.trackers["disk"].current == 16 * 8192 == free - free_bytes(small_disk)
    f.close()
    assert free_bytes(small_disk) == free and tiers.trackers["disk"].current == 0


def test_weights_the_disk_cannot_hold_fail_while_loading_before_any_compute(small_disk, opt_1mib, fault_report):
    with pytest.raises(MemoryBudgetError, match="the disk tier is over its budget"):   # the free space, measured
        LLM.from_pretrained(opt_1mib, policy=ON_DISK, offload_dir=small_disk, progress=False)
    with pytest.raises(OSError, match=f"no space left in the offload folder {small_disk}: .* needs"):
        LLM.from_pretrained(opt_1mib, policy=ON_DISK, offload_dir=small_disk, disk_mem="1GB", progress=False)
    assert os.listdir(small_disk) == [] and free_bytes(small_disk) == 1 << 20
    fault_report(ENOSPC, trials=2, faults=2, rows_lost=0, duplicates=0, outcome="clear error", note=ENOSPC_NOTE,
                 counts={"the weights (within the budget, then past it)": 2})


def test_a_kv_cache_the_disk_cannot_hold_fails_before_the_block_is_computed(small_disk, opt_1mib, monkeypatch,
                                                                             fault_report):
    from engine.schedule import BlockRunner
    llm = LLM.from_pretrained(opt_1mib, policy=Policy(gpu_batch_size=8, num_gpu_batches=8, cache_gpu_percent=0,
                                                      cache_cpu_percent=0),
                              offload_dir=small_disk, disk_mem="1GB", progress=False)
    # no shared prefix (it would be computed first); 48 + 16 positions of 4 KiB-aligned rows of a micro-batch's
    # keys and values: 256 KiB a layer and micro-batch
    prompts = [[5 + i] * 48 for i in range(64)]
    assert llm.generate(prompts[:2], max_new_tokens=16, ignore_eos=True)                  # 512 KiB: fits

    def computed(*args, **kwargs):
        raise AssertionError("the block was computed before its cache had room")
    monkeypatch.setattr(BlockRunner, "run", computed)
    with pytest.raises(OSError, match=f"no space left in the offload folder {small_disk}: the offload file "
                                      r"\d+-kv\d.mb\d.disk.bin needs"):
        llm.generate(prompts, max_new_tokens=16, ignore_eos=True)                # 8 micro-batches: 4 MiB
    llm.close()
    assert os.listdir(small_disk) == [] and free_bytes(small_disk) == 1 << 20
    fault_report(ENOSPC, trials=1, faults=1, rows_lost=0, duplicates=0, outcome="clear error", note=ENOSPC_NOTE,
                 counts={"a block's KV cache": 1})


# ---- a file cut short ---------------------------------------------------------------------------------

def test_an_offload_file_cut_short_under_the_engine_is_a_clear_error(tmp_path, opt_1mib, fault_report):
    llm = LLM.from_pretrained(opt_1mib, policy=ON_DISK, offload_dir=tmp_path, progress=False)
    layer = next(l for l in llm.layers if l.index == 1)
    os.ftruncate(next(iter(layer.weights.arrays.values())).file.fd, 0)
    with pytest.raises(OSError, match=rf"offload file \d+-\w+1.weights.bin in {tmp_path}: short read \(0 of "
                                      r"\d+ bytes at byte 0\); the file was truncated while in use"):
        llm.generate([[1, 2, 3]], max_new_tokens=2)
    llm.close()
    fault_report("truncated offload file", trials=1, faults=1, rows_lost=0, duplicates=0, outcome="clear error",
                 note="no rows (engine level); a weights file cut to 0 bytes under a loaded engine: the next read "
                      "names the file and the short read")


# ---- SIGKILL ------------------------------------------------------------------------------------------

GENERATE_FOREVER = """
import sys
from engine import LLM, Policy
llm = LLM.from_pretrained(sys.argv[1], policy=Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
                          cache_cpu_percent=0), offload_dir=sys.argv[2], progress=False)
print("ready", flush=True)
while True:
    llm.generate([[1, 2, 3, 4]] * 2, max_new_tokens=8, ignore_eos=True)
"""

STALL_BEFORE_UNLINK = """
import pathlib, sys, time
unlink = pathlib.Path.unlink
def stall(path, *args, **kwargs):
    if path.suffix == ".bin":
        print(path, flush=True)
        time.sleep(3600)
    return unlink(path, *args, **kwargs)
pathlib.Path.unlink = stall
from engine.tiers import Tiers
Tiers(sys.argv[1]).new_file("layer0.weights", 4096, 1)
"""


def start(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_an_engine_killed_mid_run_leaves_no_offload_files(tmp_path, opt_1mib, fault_report):
    offload = tmp_path / "offload"
    proc = start(GENERATE_FOREVER, opt_1mib, offload)
    try:
        assert proc.stdout.readline() == "ready\n"
        held = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        held = [h for h in held if h.startswith(str(offload))]
        assert held and all(h.endswith(" (deleted)") for h in held)       # in use, and already unlinked
        # each generate makes its cache files: while one is being made (open, then unlinked) the process's
        # own folder holds it; nothing else is ever there by name
        own = f"flexwrangle-{proc.pid}-"
        assert all(name.startswith(own) for name in os.listdir(offload))
    finally:
        kill(proc)
    assert all(name.startswith(own) for name in os.listdir(offload))     # (killed mid-creation: swept next)
    LLM.from_pretrained(opt_1mib, policy=ON_DISK, offload_dir=offload, progress=False).close()   # the next start
    assert os.listdir(offload) == []
    fault_report(KILLED, trials=1, faults=1, rows_lost=0, duplicates=0, outcome="recovered", note=KILLED_NOTE,
                 counts={"mid-run": 1})


def test_an_engine_killed_while_creating_a_file_leaves_nothing_after_the_next_start(tmp_path, opt_1mib,
                                                                                     fault_report):
    offload = tmp_path / "offload"
    proc = start(STALL_BEFORE_UNLINK, offload)
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.parent.parent == offload and left.exists()
    finally:
        kill(proc)
    assert left.exists() and left.parent.name.startswith(f"flexwrangle-{proc.pid}-")   # the kill's leftovers
    LLM.from_pretrained(opt_1mib, policy=ON_DISK, offload_dir=offload, progress=False).close()   # the next start
    assert os.listdir(offload) == []
    fault_report(KILLED, trials=1, faults=1, rows_lost=0, duplicates=0, outcome="recovered", note=KILLED_NOTE,
                 counts={"while creating a file": 1})
