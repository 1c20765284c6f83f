"""Reward: how much perplexity and factual knowledge a pruned model lost against the dense one.

    quality(m) = - ppl_weight * log(ppl / ppl_dense) - fact_weight * (fact_acc_dense - fact_acc)
                 + sum_k terms[k] * term_k(metrics, allocation, env)

The two built-in objectives are the perplexity term -log(ppl / ppl_dense) and the fact term
-(fact_acc_dense - fact_acc); user terms come from `prune_env.envs.plugins.register_reward_term` and are
selected with `reward={"terms": {"name": weight}}`. LayerPrune pays quality(final model) at the last
step (plus, optionally, a shaping term each step: - shaping_weight * the relative hidden-state error of
the block just pruned); IterativePrune pays the change in quality each step, so an episode's return
telescopes to the same final quality. `objectives` is the unweighted vector (the multi-objective
reward of `reward_mode="vector"`) and `weights` the matching linear scalarisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from ..config_files import dataclass_from_dict
from ..validation import check_number
from .plugins import reward_term

OBJECTIVES = ("ppl", "facts")


@dataclass(frozen=True)
class RewardConfig:
    ppl_weight: float = 1.0
    fact_weight: float = 1.0
    shaping_weight: float = 0.0
    rollback_penalty: float = 0.1
    terms: dict = field(default_factory=dict)  # registered reward term name -> weight

    @classmethod
    def from_dict(cls, values: dict | None) -> "RewardConfig":
        checked = dataclass_from_dict(cls, values, "reward")  # unknown keys first, then the numbers
        numbers = {f.name: float(check_number(f"reward.{f.name}", getattr(checked, f.name)))
                   for f in fields(cls) if f.name != "terms"}
        terms = {}
        for name, weight in checked.terms.items():
            reward_term(name)  # an unknown name fails here, listing the registered ones
            terms[name] = float(check_number(f"reward.terms.{name}", weight))
        return cls(**numbers, terms=terms)

    def names(self) -> list[str]:
        """The objectives in vector order: perplexity, facts, then the user terms."""
        return [*OBJECTIVES, *self.terms]

    def weights(self) -> np.ndarray:
        return np.array([self.ppl_weight, self.fact_weight, *self.terms.values()], dtype=np.float64)


def quality(ppl: float, fact_acc: float, dense_ppl: float, dense_fact_acc: float, config: RewardConfig) -> float:
    """The built-in part: 0 for the dense model, negative as the model loses perplexity or facts."""
    return -config.ppl_weight * math.log(ppl / dense_ppl) - config.fact_weight * (dense_fact_acc - fact_acc)


def objectives(metrics: dict, allocation: list[float], env, config: RewardConfig) -> np.ndarray:
    """Unweighted objectives of a model state: [-log(ppl/ppl_dense), fact_acc - fact_acc_dense, *user terms].

    `metrics` holds ppl, fact_acc, fact_nll, fact_retention and achieved_sparsity of the state, `allocation`
    its per-unit ratios; the dense reference is `env.reference`. User terms get (metrics, allocation, env):
    the allocation, not the weights, so a term is right on every fidelity (the surrogate prunes no weight).
    """
    dense = env.reference
    values = [-math.log(metrics["ppl"] / dense.ppl), -(dense.fact_acc - metrics["fact_acc"])]
    values += [float(reward_term(name)(metrics, allocation, env)) for name in config.terms]
    return np.array(values, dtype=np.float64)


def scalar_quality(metrics: dict, allocation: list[float], env, config: RewardConfig) -> float:
    """quality() plus the weighted user terms: the scalar reward's final value."""
    dense = env.reference
    base = quality(metrics["ppl"], metrics["fact_acc"], dense.ppl, dense.fact_acc, config)
    return base + sum(w * float(reward_term(name)(metrics, allocation, env)) for name, w in config.terms.items())
