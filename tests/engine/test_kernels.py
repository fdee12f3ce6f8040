"""The C kernels' cache (engine/kernels): a folder private to the user, and a library loaded only when
its bytes match the sha256 recorded when it was built; anything else is rebuilt or not used."""
import hashlib
import logging
import os
import stat
import subprocess

import pytest

from engine import kernels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(kernels, "_loaded", {})
    return tmp_path / "xdg" / "flexwrangle" / "kernels"


@pytest.fixture
def opened(monkeypatch):
    """The inodes of the files handed to the dynamic loader."""
    inodes, real = [], kernels.ctypes.CDLL

    def cdll(path, *args, **kwargs):
        inodes.append(os.stat(path).st_ino)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(kernels.ctypes, "CDLL", cdll)
    return inodes


def fresh_load(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", {})
    return kernels.qlinear()


def the_library(cache):
    (lib,) = cache.glob("qlinear-*.so")
    return lib


def recorded_hash_matches(lib) -> bool:
    return (lib.parent / (lib.name + ".sha256")).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


def test_a_new_cache_is_private_and_records_the_hash_of_what_it_loads(cache, opened):
    assert kernels.qlinear() is not None
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    lib = the_library(cache)
    assert recorded_hash_matches(lib) and opened == [lib.stat().st_ino]


def test_a_corrupt_library_is_rebuilt_not_loaded(cache, opened, monkeypatch, caplog):
    kernels.qlinear()
    lib = the_library(cache)
    # garbage in place of the cached build: a new file, as the library this process has mapped must
    # keep its pages (writing over it in place would SIGBUS the process when it next touches them)
    (lib.parent / "garbage").write_bytes(b"\x7fELF" + bytes(4000))
    os.replace(lib.parent / "garbage", lib)
    garbage = lib.stat().st_ino

    with caplog.at_level(logging.WARNING, "engine.kernels"):
        assert fresh_load(monkeypatch) is not None
    assert "does not match the sha256 recorded when it was built; rebuilding" in caplog.text
    assert garbage not in opened[1:] and recorded_hash_matches(lib) and opened[-1] == lib.stat().st_ino


def test_a_foreign_library_with_another_hash_is_not_loaded(cache, opened, tmp_path, monkeypatch):
    kernels.qlinear()
    lib = the_library(cache)
    src = tmp_path / "foreign.c"
    src.write_text("int qlinear_out_groups(void) { return 42; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)   # a real library, not ours
    foreign = lib.stat().st_ino

    fn = fresh_load(monkeypatch)

    assert fn is not None and foreign not in opened
    assert recorded_hash_matches(lib) and lib.stat().st_ino != foreign


def test_a_library_without_a_recorded_hash_is_rebuilt(cache, opened, monkeypatch):
    kernels.qlinear()
    lib = the_library(cache)
    (lib.parent / (lib.name + ".sha256")).unlink()
    unrecorded = lib.stat().st_ino

    assert fresh_load(monkeypatch) is not None
    assert unrecorded not in opened[1:] and recorded_hash_matches(lib)


@pytest.mark.parametrize("make, problem", [
    (lambda d: (d.mkdir(parents=True), d.chmod(0o777)), "writable by others"),
    (lambda d: (d.parent.mkdir(parents=True), (d.parent / "elsewhere").mkdir(mode=0o700),
                d.symlink_to(d.parent / "elsewhere")), "not a folder of its own"),
    (lambda d: (d.mkdir(parents=True), os.chown(d, 65534, 65534)), "owned by uid 65534"),
])
def test_a_folder_others_could_write_to_is_not_used(cache, monkeypatch, caplog, make, problem):
    if problem.startswith("owned") and os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    make(cache)
    before = stat.S_IMODE(os.lstat(cache).st_mode)

    with caplog.at_level(logging.WARNING, "engine.kernels"):
        assert kernels.qlinear() is not None                      # built for this process alone
    assert f"not using the kernel cache {cache} ({problem}" in caplog.text
    assert os.listdir(cache) == [] and stat.S_IMODE(os.lstat(cache).st_mode) == before


def test_a_folder_only_its_owner_can_write_to_is_made_private_and_used(cache):
    cache.mkdir(parents=True)
    cache.chmod(0o755)
    assert kernels.qlinear() is not None
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and recorded_hash_matches(the_library(cache))


def test_without_a_compiler_the_torch_path_is_taken_with_a_warning(cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(cache / "no-such-gcc"))
    with caplog.at_level(logging.WARNING, "engine.kernels"):
        assert kernels.qlinear() is None
    assert "C kernel qlinear unavailable" in caplog.text and "the slower torch path" in caplog.text
