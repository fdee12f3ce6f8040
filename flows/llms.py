"""Which language model a flow run uses: a ``model`` string resolved once per run.

``model`` is either

* a name or path the engine knows (``"smollm2-135m"``, ``"models/opt-125m"``): loaded with
  ``engine.LLM.from_pretrained(model, policy=..., gpu_mem=..., cpu_mem=..., disk_mem=...,
  offload_dir=...)``. ``policy="auto"`` (or ``{"auto": true, ...}``) searches a placement for the
  run's own workload inside that budget at the precision the policy names -- never a different
  precision than asked for, since precision changes answers and is part of the run key (a field
  given as None is left to the search, and the flow puts its choice into the run key);
* ``"constant:<text>"``: a baseline that answers ``<text>`` to every prompt, with no model at
  all. ``"constant:No"`` is the majority-class baseline of entity matching and error
  detection, and a deterministic, instant stand-in wherever a flow's wiring is what is under
  test (the real-server test deploys it);
* ``"<scheme>:<rest>"`` for a scheme added with :func:`register` -- the way to plug another
  backend (or a fake in tests) into the same flow without touching it.

Every model is an object with ``generate_text(prompts, max_new_tokens, stop) -> list[str]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "ModelLoadError",
    "TextModel",
    "ConstantLLM",
    "register",
    "unregister",
    "load_llm",
    "model_shape",
    "engine_report",
    "precision",
    "policy_json",
]


class ModelLoadError(RuntimeError):
    """The model named by a flow's ``model`` parameter could not be loaded."""


class TextModel(Protocol):
    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int = ..., stop: str | None = ..., **kw: Any
    ) -> list[str]: ...


Factory = Callable[[str, Any], TextModel]
_SCHEMES: dict[str, Factory] = {}


def register(scheme: str, factory: Factory) -> None:
    """Resolve ``"<scheme>:<rest>"`` models with ``factory(rest, policy)``."""
    if not scheme.isidentifier():
        raise ValueError(f"scheme must be an identifier, got {scheme!r}")
    _SCHEMES[scheme] = factory


def unregister(scheme: str) -> None:
    _SCHEMES.pop(scheme, None)


class ConstantLLM:
    """Answers the same text to every prompt (a baseline, not a language model)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 8,
                      stop: str | None = "\n", **kw: Any) -> list[str]:
        return [self.answer for _ in prompts]


register("constant", lambda rest, policy: ConstantLLM(rest))


def _engine_policy(policy: Mapping[str, Any] | str | None) -> Any:
    if policy is None:
        return policy
    if policy == "auto":
        return {"auto": True}          # the search keeps full precision (engine.generate.auto_precision)
    if isinstance(policy, str):
        raise ModelLoadError(f'policy must be a dict of Policy fields or "auto", got {policy!r}')
    if policy.get("auto"):
        return dict(policy)
    from engine import Policy

    try:
        return Policy.from_dict(dict(policy))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid policy {dict(policy)!r}: {exc}") from exc


def _scheme_model(model: str, policy: Any) -> TextModel | None:
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a non-empty string, got {model!r}")
    scheme, sep, rest = model.partition(":")
    return _SCHEMES[scheme](rest, policy) if sep and scheme in _SCHEMES else None


def load_llm(model: str, policy: Mapping[str, Any] | str | None = None,
             budget: Mapping[str, Any] | None = None, workload: tuple[int, int] | None = None) -> TextModel:
    """Load ``model`` (see the module doc); raise :class:`ModelLoadError` with the reason.

    ``budget``: the engine's ``gpu_mem``, ``cpu_mem``, ``disk_mem`` and ``offload_dir`` (None: the
    machine's). ``workload``: (prompt tokens, new tokens) an automatic policy is searched for."""
    found = _scheme_model(model, policy)
    if found is not None:
        return found
    engine_policy = _engine_policy(policy)
    try:
        from engine import LLM, MemoryBudgetError
    except ImportError as exc:  # the engine is part of this project; say so if it is broken
        raise ModelLoadError(f"cannot import the engine to load {model!r}: {exc}") from exc
    try:
        return LLM.from_pretrained(model, policy=engine_policy, workload=workload, progress=False,
                                   **{k: v for k, v in (budget or {}).items() if v is not None})
    except MemoryBudgetError as exc:   # incl. the policy search's: which tier is short, by how much
        raise ModelLoadError(f"model {model!r} does not fit the memory budget {dict(budget or {})}: {exc}") from exc
    except (OSError, ValueError, KeyError, LookupError) as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc


class _Shape:
    """What building prompts needs of a model: its tokenizer and context size, no weights."""

    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self.tokenizer, self.max_context = tokenizer, max_context


def model_shape(model: str, policy: Mapping[str, Any] | str | None = None) -> Any:
    """``model``'s tokenizer and context size without placing its weights (a ``"<scheme>:"`` model
    is loaded: it is cheap and may have its own), so prompts can be built, and an automatic policy
    searched for their lengths, before the engine is placed."""
    found = _scheme_model(model, policy)
    if found is not None:
        return found
    try:
        from engine.registry import open_model

        _, tokenizer, config = open_model(model, False)
    except (OSError, ValueError, KeyError, LookupError) as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
    return _Shape(tokenizer, config.max_positions)


def precision(llm: Any) -> dict[str, Any]:
    """The fields of the engine's placed policy that change answers (engine.generate.PRECISION_FIELDS)."""
    from engine.generate import PRECISION_FIELDS

    return {f: getattr(llm.policy, f) for f in PRECISION_FIELDS}


def engine_report(llm: Any) -> dict[str, Any]:
    """The engine's placed policy (every field) and measured peaks, for the run record; {} for
    models that are not the engine."""
    if not hasattr(llm, "memory_report") or not hasattr(llm, "policy"):
        return {}
    mem = llm.memory_report()
    return {"policy": json.dumps(llm.policy.to_dict(), sort_keys=True, default=str),
            "peak_bytes": mem["peak"], "peak_rss_bytes": mem["peak_rss_bytes"]}


def measured(report: Mapping[str, Any]) -> dict[str, Any]:
    """An engine report without its policy: what a run record gains when the run ends (it names the
    placed policy from the start)."""
    return {k: v for k, v in report.items() if k != "policy"}


def policy_json(policy: Mapping[str, Any] | str | None) -> str:
    """The policy parameter as canonical JSON text (for run keys and result rows)."""
    return json.dumps(policy, sort_keys=True, separators=(",", ":"), default=str)
