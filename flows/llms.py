"""Which language model a flow run uses: a ``model`` string resolved once per run.

``model`` is either

* a name or path the engine knows (``"smollm2-135m"``, ``"models/opt-125m"``): loaded with
  ``engine.LLM.from_pretrained(model, policy=...)``;
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
    if policy is None or policy == "auto":
        return policy
    if isinstance(policy, str):
        raise ModelLoadError(f'policy must be a dict of Policy fields or "auto", got {policy!r}')
    from engine import Policy

    try:
        return Policy.from_dict(dict(policy))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid policy {dict(policy)!r}: {exc}") from exc


def load_llm(model: str, policy: Mapping[str, Any] | str | None = None) -> TextModel:
    """Load ``model`` (see the module doc); raise :class:`ModelLoadError` with the reason."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a non-empty string, got {model!r}")
    scheme, sep, rest = model.partition(":")
    if sep and scheme in _SCHEMES:
        return _SCHEMES[scheme](rest, policy)
    engine_policy = _engine_policy(policy)
    try:
        from engine import LLM
    except ImportError as exc:  # the engine is part of this project; say so if it is broken
        raise ModelLoadError(f"cannot import the engine to load {model!r}: {exc}") from exc
    try:
        return LLM.from_pretrained(model, policy=engine_policy)
    except (OSError, ValueError, KeyError, LookupError) as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc


def policy_json(policy: Mapping[str, Any] | str | None) -> str:
    """The policy parameter as canonical JSON text (for run keys and result rows)."""
    return json.dumps(policy, sort_keys=True, separators=(",", ":"), default=str)
