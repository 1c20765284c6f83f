"""The typed options of an llm agent config: the `agent:` mapping and the `backend:` mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agents.llm.chat import ChatBackend, LocalBackendConfig, LocalChatBackend
from agents.llm.endpoint import resolve_endpoint
from agents.llm.openai_http import HTTPBackendConfig, OpenAIChatBackend
from prune_env.config_files import ConfigError, dataclass_from_dict
from prune_env.envs.rewards import check_preference
from prune_env.validation import check_choice, check_number

__all__ = ["BACKEND_CONFIGS", "AgentOptions", "backend_config", "build_backend", "check_backend"]

BACKEND_CONFIGS = {"openai": HTTPBackendConfig, "local": LocalBackendConfig}


@dataclass
class AgentOptions:
    """The `agent:` mapping of an llm agent config.

    max_invalid: invalid answers tolerated per decision before the zscore-greedy fallback.
    memory_size: past moves shown in the prompt. use_candidates: None = candidate scoring iff the
    backend `chooses`. on_backend_error: "fallback" (zscore-greedy for that decision, circuit breaker)
    or "raise" (the error is written to the transcript, then raised: the benchmark cell fails).
    circuit_breaker: consecutive failed backend requests after which the backend is not asked again
    this episode. rollback_cooldown: moves during which the fallback avoids units of a rolled-back move.
    preference: None, or the w in [0, 1] on knowledge vs perplexity that the prompts state (the same
    trade-off a preference-conditioned LayerPrune env pays, `prune_env.envs.rewards.preference_quality`).
    """

    max_units_per_step: int = 4
    max_invalid: int = 3
    memory_size: int = 12
    use_candidates: bool | None = None
    on_backend_error: Literal["fallback", "raise"] = "fallback"
    circuit_breaker: int = 3
    rollback_cooldown: int = 3
    max_iterations: int | None = None
    preference: float | None = None

    def __post_init__(self) -> None:
        check_number("max_units_per_step", self.max_units_per_step, low=1, integer=True)
        check_number("max_invalid", self.max_invalid, low=1, integer=True)
        check_number("memory_size", self.memory_size, low=1, integer=True)
        check_number("circuit_breaker", self.circuit_breaker, low=1, integer=True)
        check_number("rollback_cooldown", self.rollback_cooldown, low=0, integer=True)
        if self.max_iterations is not None:
            check_number("max_iterations", self.max_iterations, low=1, integer=True)
        if self.preference is not None:
            self.preference = check_preference(self.preference)


def backend_config(mapping: dict | None) -> HTTPBackendConfig | LocalBackendConfig:
    """The typed backend config of {"type": "openai" | "local", ...options} (default: openai)."""
    if mapping is None:
        mapping = {"type": "openai"}
    if not isinstance(mapping, dict):
        raise ConfigError(f"llm backend must be a mapping such as {{type: openai, model: ...}}, got {mapping!r}")
    options = dict(mapping)
    kind = check_choice("llm backend type", options.pop("type", "openai"), sorted(BACKEND_CONFIGS))
    return dataclass_from_dict(BACKEND_CONFIGS[kind], options, f"llm backend ({kind})")


def check_backend(mapping: dict | None) -> None:
    """Refuse a backend mapping that could only fail every request (bad base_url, no model id, also from
    the environment); the benchmark calls it when its config is loaded, before any model loads. The
    backend itself is built later, when an episode starts."""
    config = backend_config(mapping)
    if isinstance(config, HTTPBackendConfig):
        resolve_endpoint(config.base_url, config.model)


def build_backend(config: HTTPBackendConfig | LocalBackendConfig) -> ChatBackend:
    """The backend a typed config describes (built when an episode starts: a served model may not be up yet)."""
    if isinstance(config, LocalBackendConfig):
        return LocalChatBackend(config)
    return OpenAIChatBackend(config)
