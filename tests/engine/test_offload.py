"""Every offloading policy gives the same tokens as the all-in-memory run, within measured budgets."""
import os

import pytest
import torch
from enginekit import MIXED_PROMPTS, POLICIES

from engine import LLM, MemoryBudgetError, Policy
from engine.tiers import STAGING

PROMPTS = MIXED_PROMPTS * 2          # 12 sequences: blocks of 2x3 and 4x1 both leave a remainder


@pytest.fixture(scope="module")
def reference(tiny_opt):
    llm = LLM.from_pretrained(tiny_opt[0], progress=False, policy=Policy(gpu_batch_size=12))
    return llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("batch", [(2, 3), (4, 1)])
def test_policy_gives_the_all_in_memory_tokens(name, batch, tiny_opt, reference, tmp_path):
    policy = Policy(gpu_batch_size=batch[0], num_gpu_batches=batch[1], **POLICIES[name])
    llm = LLM.from_pretrained(tiny_opt[0], policy=policy, offload_dir=tmp_path, progress=False)
    assert llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True) == reference
    on_disk = llm.weight_bytes()["disk"]
    assert (on_disk > 0) == (policy.w_gpu_percent + policy.w_cpu_percent < 100)
    if policy.w_gpu_percent == 0:
        assert llm.weight_bytes()["gpu"] == 0
    llm.close()
    assert os.listdir(tmp_path) == []                    # offload files are removed


@pytest.mark.parametrize("name", POLICIES)
def test_qwen2_policy_gives_the_all_in_memory_tokens(name, tiny_qwen2, tmp_path):
    """Qwen2's q/k/v biases and GQA travel through every placement like any other weight."""
    want = LLM.from_pretrained(tiny_qwen2[0], progress=False, policy=Policy(gpu_batch_size=12)).generate(
        PROMPTS, max_new_tokens=8, ignore_eos=True)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, **POLICIES[name])
    llm = LLM.from_pretrained(tiny_qwen2[0], policy=policy, offload_dir=tmp_path, progress=False)
    assert llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True) == want
    llm.close()


def test_disk_tier_is_real_direct_io(tiny_opt, tmp_path):
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0)
    llm = LLM.from_pretrained(tiny_opt[0], policy=policy, offload_dir=tmp_path, progress=False)
    arrays = [a for layer in llm.layers for a in layer.weights.arrays.values()]
    assert all(a.file is not None and a.file.direct for a in arrays)
    files = {a.file.fd: os.fstat(a.file.fd) for a in arrays}
    assert os.listdir(tmp_path) == []                                   # unlinked once open
    assert all(st.st_nlink == 0 and st.st_size % 4096 == 0 and st.st_blocks * 512 >= st.st_size
               for st in files.values())                                # and every byte reserved
    assert llm.tiers.peaks()["disk"] >= llm.weight_bytes()["disk"] > 0
    # a layer's disk-homed tensors share one file, and loading the layer reads it once
    assert len(files) == len(llm.layers)
    layer = next(l for l in llm.layers if len(l.weights.arrays) > 1)
    reads = []
    f = next(iter(layer.weights.arrays.values())).file
    original = f.read_rows
    f.read_rows = lambda *a, **k: reads.append(a) or original(*a, **k)
    with layer.weights.load(llm.pool) as load:
        assert len(reads) == 1
        w = load.finish()                             # widen fp16 into float32 (deferred to the computing thread)
        for name, t in w.items():                     # the same values as each tensor read alone
            alone = layer.weights.arrays[name].read(0, 1, torch.device("cpu"), torch.float32)[0]
            assert torch.equal(t, alone)
    llm.close()
    assert os.listdir(tmp_path) == []


def test_measured_peaks_respect_the_budgets(tiny_opt, tmp_path):
    free = LLM.from_pretrained(tiny_opt[0], policy=Policy(gpu_batch_size=4, num_gpu_batches=3), progress=False)
    free.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    need = free.tiers.peaks()["gpu"]
    offloaded = Policy(gpu_batch_size=4, num_gpu_batches=3, w_gpu_percent=0, w_cpu_percent=50,
                       cache_gpu_percent=0, cache_cpu_percent=50)
    cap = need // 2
    llm = LLM.from_pretrained(tiny_opt[0], policy=offloaded, offload_dir=tmp_path, gpu_mem=cap, progress=False)
    llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    peaks = llm.memory_report()["peak"]
    assert 0 < peaks["gpu"] <= cap
    assert peaks["disk"] > 0 and peaks["cpu"] > 0
    assert llm.memory_report()["peak_rss_bytes"] > 0


def test_a_policy_that_cannot_fit_fails_before_work_and_names_the_tier(tiny_opt, tmp_path):
    with pytest.raises(MemoryBudgetError, match="gpu tier"):
        LLM.from_pretrained(tiny_opt[0], gpu_mem="10KB", progress=False)
    llm = LLM.from_pretrained(tiny_opt[0], policy=Policy(gpu_batch_size=64, w_gpu_percent=0, w_cpu_percent=100),
                              gpu_mem="200KB", progress=False)
    with pytest.raises(MemoryBudgetError, match="does not fit: the gpu tier needs .* over by"):
        llm.generate([[1] * 100] * 64, max_new_tokens=20)
    assert llm.tiers.trackers["gpu"].current == 0          # nothing was allocated for the failed block


def test_disk_policy_without_offload_dir_says_what_to_pass(tiny_opt):
    with pytest.raises(ValueError, match="offload_dir"):
        LLM.from_pretrained(tiny_opt[0], policy=Policy(w_gpu_percent=0, w_cpu_percent=0), progress=False)


@pytest.mark.parametrize("placement", [dict(), dict(w_gpu_percent=0, w_cpu_percent=0, compress_weight=True)])
def test_a_tied_lm_head_shares_the_embedding_instead_of_a_second_copy(tiny_opt, tiny_llama, tmp_path, placement):
    tied = LLM.from_pretrained(tiny_opt[0], policy=Policy(**placement), offload_dir=tmp_path, progress=False)
    embed, head = tied.layers[0].weights.arrays, tied.layers[-1].weights.arrays
    assert head["lm_head"] is embed["embed_tokens"]
    held = sum(tied.weight_bytes().values())
    assert held == sum({id(a): a.nbytes for l in tied.layers for a in l.weights.arrays.values()}.values())
    assert held < sum(l.weights.bytes_on(t) for l in tied.layers for t in ("gpu", "cpu", "disk"))
    tied.close()
    assert os.listdir(tmp_path) == []
    untied = LLM.from_pretrained(tiny_llama[0], progress=False)             # its own lm_head.weight
    assert untied.layers[-1].weights.arrays["lm_head"] is not untied.layers[0].weights.arrays["embed_tokens"]


def test_offload_files_are_private_unlinked_once_open_and_never_clobbered(tmp_path):
    """Two engines in one process may share a folder; what is in it already is left alone."""
    from engine.tiers import Tiers
    (tmp_path / "someone-elses.bin").write_bytes(b"someone else's")
    a, b = Tiers(tmp_path), Tiers(tmp_path)
    fa, fb = a.new_file("layer0.weights", 4096, 1), b.new_file("layer0.weights", 4096, 1)
    assert fa.path != fb.path and fa.path.parent == fb.path.parent != tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["someone-elses.bin"]   # nothing to see, or to kill
    fa.write_rows(0, torch.full((1, 4096), 7, dtype=torch.uint8))
    fb.write_rows(0, torch.full((1, 4096), 9, dtype=torch.uint8))
    for f, value in ((fa, 7), (fb, 9)):
        raw, buf = f.read_rows(0, 1)
        assert bool((raw == value).all())
        del raw
        STAGING.put(buf)
        f.close()
    assert a.trackers["disk"].current == b.trackers["disk"].current == 0
    assert (tmp_path / "someone-elses.bin").read_bytes() == b"someone else's"


def test_a_private_folder_that_is_not_private_is_refused(tmp_path):
    import stat

    from engine.disk import _folder_name
    from engine.tiers import Tiers
    planted = tmp_path / _folder_name(os.getpid())
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(PermissionError, match="not this process's private folder.*drwxrwxrwx"):
        Tiers(tmp_path).new_file("layer0.weights", 4096, 1)
    assert stat.S_IMODE(planted.stat().st_mode) == 0o777


def test_a_full_disk_names_the_offload_folder_the_bytes_and_what_to_do(tmp_path, monkeypatch):
    import errno

    import engine.disk as disk
    from engine.tiers import Tiers

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(disk.os, "posix_fallocate", full)
    tiers = Tiers(tmp_path)
    with pytest.raises(OSError, match=f"no space left in the offload folder {tmp_path}: the offload file "
                                      r"\d+-layer0.weights.bin needs 8192 bytes .*offload_dir.*disk_mem") as e:
        tiers.new_file("layer0.weights", 4096, 2)
    assert e.value.errno == errno.ENOSPC
    assert tiers.trackers["disk"].current == 0 and os.listdir(tmp_path) == []

    monkeypatch.undo()
    f = tiers.new_file("layer0.weights", 4096, 1)
    monkeypatch.setattr(disk.os, "pwrite", full)     # a copy-on-write file system can still fill up on a write
    with pytest.raises(OSError, match=f"no space left in the offload folder {tmp_path}.* needs 4096 bytes"):
        f.write_rows(0, torch.zeros(1, 4096, dtype=torch.uint8))
    monkeypatch.undo()
    f.close()


def test_folders_of_dead_processes_are_swept_at_start_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from engine.disk import _folder_name
    from engine.tiers import Tiers
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    live, reused = _folder_name(os.getpid()), f"flexwrangle-{os.getpid()}-1@{host}"    # same pid, other start
    gone, elsewhere = f"flexwrangle-{dead.stdout.strip()}-1@{host}", f"flexwrangle-{dead.stdout.strip()}-1@other-host"
    for name in (live, reused, gone, elsewhere):
        (tmp_path / name).mkdir(mode=0o700)
        (tmp_path / name / "1-layer0.weights.bin").write_bytes(b"x")    # killed before the unlink
    not_a_folder = f"flexwrangle-{dead.stdout.strip()}-2@{host}"
    (tmp_path / not_a_folder).write_bytes(b"")
    Tiers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, elsewhere, not_a_folder])
