"""Pruning methods by name: the built-in operators and any the user registers, usable by `method=` everywhere.

A method says how it removes `ratio` of one linear's weights given the input statistics the sequential
pass collected on that linear (`statistics`: "none", "norms" for ||X_j||_2, "hessian" for SparseGPT's
2 X X^T), and how to rank weights for the cheap precomputed masks (`rank_score`; `per_row` compares
within each output row, else across the whole matrix). The envs, `prune_model` and the CLI all read
this one registry, so a registered method works through `gym.make(..., method="mine")`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .calibration import ActivationStats
from .masking import magnitude_mask, sparsegpt_prune, wanda_mask, wanda_scores

# (dense weight [out, in], statistics of its input or None, ratio, N:M pattern) -> (keep mask, new weight or None)
SelectFn = Callable[[torch.Tensor, ActivationStats | None, float, str | None], tuple[torch.Tensor, torch.Tensor | None]]
# (dense weight [out, in], activation norms [in]) -> scores [out, in]; low scores are removed first
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PruningMethod:
    name: str
    select: SelectFn
    statistics: Literal["none", "norms", "hessian"] = "norms"
    rank_score: ScoreFn = wanda_scores
    per_row: bool = True


def _magnitude(weight, stats, ratio, pattern):
    return magnitude_mask(weight, ratio, pattern), None


def _wanda(weight, stats, ratio, pattern):
    return wanda_mask(weight, stats.norm, ratio, pattern), None


def _sparsegpt(weight, stats, ratio, pattern):
    return sparsegpt_prune(weight, stats.hessian, ratio, pattern)


def _abs_weight(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


# SparseGPT's reconstruction cannot be precomputed: its cheap ranks are Wanda's
_REGISTRY: dict[str, PruningMethod] = {
    "magnitude": PruningMethod("magnitude", _magnitude, "none", _abs_weight, per_row=False),
    "wanda": PruningMethod("wanda", _wanda, "norms"),
    "sparsegpt": PruningMethod("sparsegpt", _sparsegpt, "hessian"),
}


def register_method(name: str, select: SelectFn, statistics: Literal["none", "norms", "hessian"] = "norms",
                    rank_score: ScoreFn = wanda_scores, per_row: bool = True) -> PruningMethod:
    """Make `method=name` available to the envs and `prune_model`; `select` must remove exactly the
    requested share of weights (the envs' budget bookkeeping counts the mask's zeros).

    Args:
        name: the method's name, new and non-empty.
        select: (dense weight [out, in], input statistics or None, ratio, N:M pattern or None) -> (keep
            mask, True = keep; new weight or None to keep the dense values).
        statistics: what the sequential pass collects on each linear's input for `select`: "none",
            "norms" (||X_j||_2, as Wanda) or "hessian" (2 X X^T, as SparseGPT).
        rank_score: (dense weight, activation norms) -> scores, low removed first: the cheap precomputed
            masks of the proxy fidelity and IterativePrune.
        per_row: `rank_score` compares within each output row (else across the whole matrix).

    Returns:
        The registered `PruningMethod`.

    Raises:
        ValueError: the name is empty or taken, or `statistics` is not one of the three.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name {name!r} must be a non-empty string")
    if name in _REGISTRY:
        raise ValueError(f"pruning method {name!r} is already registered: choose another name")
    if statistics not in ("none", "norms", "hessian"):
        raise ValueError(f"statistics={statistics!r} is not one of ['none', 'norms', 'hessian']")
    method = PruningMethod(name, select, statistics, rank_score, per_row)
    _REGISTRY[name] = method
    return method


def method_names() -> list[str]:
    return list(_REGISTRY)


def check_method(method: str) -> str:
    if method not in _REGISTRY:
        raise ValueError(f"unknown pruning method {method!r}: use one of {', '.join(_REGISTRY)} "
                         f"(or register one with prune_env.register_method)")
    return method


def get_method(name: str) -> PruningMethod:
    return _REGISTRY[check_method(name)]
