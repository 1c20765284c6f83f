"""Reward: how much perplexity and factual knowledge a pruned model lost against the dense one.

    quality(m) = - ppl_weight * log(ppl / ppl_dense) - fact_weight * (fact_acc_dense - fact_acc)

LayerPrune-v0 pays quality(final model) at the last step (plus, optionally, a shaping term each step:
- shaping_weight * the relative hidden-state error of the block just pruned). IterativePrune-v0 pays
the change in quality each step, so an episode's return telescopes to the same final quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .config import dataclass_from_dict


@dataclass(frozen=True)
class RewardConfig:
    ppl_weight: float = 1.0
    fact_weight: float = 1.0
    shaping_weight: float = 0.0
    rollback_penalty: float = 0.1

    @classmethod
    def from_dict(cls, values: dict | None) -> "RewardConfig":
        checked = dataclass_from_dict(cls, values, "reward")  # unknown keys first, then the numbers
        try:
            config = cls(**{f.name: float(getattr(checked, f.name)) for f in fields(cls)})
        except (TypeError, ValueError):
            raise ValueError(f"reward weights must be numbers, got {values!r}") from None
        if any(math.isnan(getattr(config, f.name)) for f in fields(cls)):
            raise ValueError("reward weights must be numbers, not NaN")
        return config


def quality(ppl: float, fact_acc: float, dense_ppl: float, dense_fact_acc: float, config: RewardConfig) -> float:
    """0 for the dense model, negative as the model loses perplexity or facts."""
    return -config.ppl_weight * math.log(ppl / dense_ppl) - config.fact_weight * (dense_fact_acc - fact_acc)
