"""Model names -> what the engine loads: a checkpoint directory, or a published OPT name.

    resolve_model("smollm2-135m")            -> <models>/SmolLM2-135M-Instruct.Q4_1.gguf.flexwrangle/
    resolve_model("path/to/model.gguf")      -> its converted directory (engine.gguf.convert_gguf)
    resolve_model("path/to/hf_checkpoint/")  -> the directory itself
    resolve_model("facebook/opt-1.3b")       -> "facebook/opt-1.3b" (a shape for dummy weights)

`open_model` turns any of these into (weight source, tokenizer, ModelConfig) for LLM.from_pretrained.

<models> is $FLEXWRANGLE_MODELS_DIR, else `models/` in the repository; `make model` fills it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import OPT_SIZES, opt_config, read_hf_config
from .weights import Checkpoint, DummyWeights

# Embedded models: name (lower case) -> file under the models directory.
EMBEDDED: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "huggingfacetb/smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
FETCH_TARGET = "make model"      # the Makefile target that runs scripts/fetch_model.sh


def models_dir() -> Path:
    """Where embedded model files live: $FLEXWRANGLE_MODELS_DIR, else <repo>/models."""
    env = os.environ.get("FLEXWRANGLE_MODELS_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "models"


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """A checkpoint directory (Path) for a model name or path, or an OPT name (str) for dummy weights."""
    from .gguf import convert_gguf

    text = os.fspath(name_or_path)
    embedded = EMBEDDED.get(text.lower())
    if embedded is not None:
        path = models_dir() / embedded
        if not path.is_file():
            raise FileNotFoundError(f"{text}: model file {path} is missing; run `{FETCH_TARGET}` to fetch it "
                                    "(or set FLEXWRANGLE_MODELS_DIR to the directory that holds it)")
        return convert_gguf(path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path)
        raise ValueError(f"{text}: a file that is not a .gguf; pass a .gguf file or a checkpoint directory")
    if path.suffix.lower() == ".gguf":
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if _is_opt_name(text):
        return text
    raise ValueError(
        f"unknown model {text!r}: pass an embedded model name ({', '.join(sorted(EMBEDDED))}), "
        f"a published OPT name ({', '.join(OPT_SIZES)}, optionally as facebook/opt-...), "
        "a .gguf file, or a Hugging Face checkpoint directory (config.json + safetensors)")


def _is_opt_name(text: str) -> bool:
    try:
        opt_config(text)                # the same spellings the engine's OPT table accepts
    except ValueError:
        return False
    return True


def open_model(path_or_name, dummy: bool):
    """(weight source, tokenizer or None, ModelConfig) for a name, a directory or a GGUF file."""
    path = Path(resolve_model(path_or_name))
    if path.is_dir():
        config = read_hf_config(path)
        if Path(path_or_name) != path:                     # a name the registry resolved: keep the name
            config = config.replace(name=str(path_or_name))
        source = DummyWeights() if dummy else Checkpoint(path)
        return source, _load_tokenizer(path), config
    if dummy:
        return DummyWeights(), None, opt_config(str(path_or_name))
    if _is_opt_name(str(path_or_name)):
        raise FileNotFoundError(f"{path_or_name}: no checkpoint here (this machine has no model hub); pass "
                                "dummy=True (--dummy) for random weights of that shape, or a local "
                                "checkpoint directory")
    raise FileNotFoundError(f"{path_or_name}: not a checkpoint directory, a .gguf file or a known model "
                            "name (smollm2-135m, or an OPT size such as opt-1.3b with dummy=True)")


def _load_tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
