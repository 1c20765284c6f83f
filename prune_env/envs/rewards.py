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

The knowledge objective reads `knowledge_metric`: answer-balanced retention of the facts the dense model
answers greedy-exact (the default; its dense value is 1), or answer-balanced multiple-choice accuracy
`fact_acc_balanced`, which still varies where greedy-exact knowledge is gone (60 % on SmolLM2-135M), both as
knowledge / knowledge_dense - 1 (0 for the dense model; -1 when nothing is kept); or the answer-balanced
answer perplexity `fact_answer_ppl_balanced` as -log(answer_ppl / answer_ppl_dense), the perplexity term's
form and units (nats per token) on the facts' right answers, the smoothest of the three
(prune_env/data/knowledge.py). It is an objective only when asked for:
`knowledge_weight` None (the default) leaves the vector and the scalar as they were; a number puts
"knowledge" after "facts" in the vector and adds knowledge_weight * it to the scalar (0: vector only).
`preference_quality` is LayerPrune's preference-conditioned scalar (1 - w) * ppl + w * knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ..config_files import dataclass_from_dict
from ..validation import check_number
from .plugins import reward_term

OBJECTIVES = ("ppl", "facts")
KNOWLEDGE = "knowledge"
KNOWLEDGE_METRICS = ("fact_retention_balanced", "fact_acc_balanced", "fact_answer_ppl_balanced")
LOWER_IS_BETTER = ("fact_answer_ppl_balanced",)  # a perplexity: its objective is -log(value / dense)


@dataclass(frozen=True)
class RewardConfig:
    ppl_weight: float = 1.0
    fact_weight: float = 1.0
    shaping_weight: float = 0.0
    rollback_penalty: float = 0.1
    terms: dict = field(default_factory=dict)  # registered reward term name -> weight
    knowledge_weight: float | None = None  # None: no knowledge objective (module docstring)
    knowledge_metric: str = "fact_retention_balanced"  # what the knowledge objective reads (KNOWLEDGE_METRICS)

    @classmethod
    def from_dict(cls, values: dict | None) -> "RewardConfig":
        checked = dataclass_from_dict(cls, values, "reward")  # unknown keys first, then the numbers
        numbers = {f.name: float(check_number(f"reward.{f.name}", getattr(checked, f.name)))
                   for f in fields(cls) if f.name not in ("terms", "knowledge_weight", "knowledge_metric")}
        if checked.knowledge_weight is not None:
            numbers["knowledge_weight"] = float(check_number("reward.knowledge_weight", checked.knowledge_weight))
        if checked.knowledge_metric not in KNOWLEDGE_METRICS:
            raise ValueError(f"reward.knowledge_metric={checked.knowledge_metric!r} is not a knowledge metric: use "
                             f"one of {', '.join(KNOWLEDGE_METRICS)}")
        terms = {}
        for name, weight in checked.terms.items():
            reward_term(name)  # an unknown name fails here, listing the registered ones
            terms[name] = float(check_number(f"reward.terms.{name}", weight))
        return cls(**numbers, terms=terms, knowledge_metric=checked.knowledge_metric)

    def names(self) -> list[str]:
        """The objectives in vector order: perplexity, facts, knowledge (when asked for), then the user terms."""
        return [*OBJECTIVES, *self._knowledge([KNOWLEDGE]), *self.terms]

    def weights(self) -> np.ndarray:
        return np.array([self.ppl_weight, self.fact_weight, *self._knowledge([self.knowledge_weight]),
                         *self.terms.values()], dtype=np.float64)

    def _knowledge(self, entries: list) -> list:
        return [] if self.knowledge_weight is None else entries


def quality(ppl: float, fact_acc: float, dense_ppl: float, dense_fact_acc: float, config: RewardConfig) -> float:
    """The built-in part: 0 for the dense model, negative as the model loses perplexity or facts."""
    return -config.ppl_weight * math.log(ppl / dense_ppl) - config.fact_weight * (dense_fact_acc - fact_acc)


def objectives(metrics: dict, allocation: list[float], env, config: RewardConfig) -> np.ndarray:
    """Unweighted objectives of a model state: [-log(ppl/ppl_dense), fact_acc - fact_acc_dense, knowledge (with
    a knowledge_weight), *user terms].

    `metrics` holds ppl, fact_acc, fact_nll, fact_retention and achieved_sparsity of the state, `allocation`
    its per-unit ratios; the dense reference is `env.reference`. User terms get (metrics, allocation, env):
    the allocation, not the weights, so a term is right on every fidelity (the surrogate prunes no weight).
    """
    dense = env.reference
    values = [-math.log(metrics["ppl"] / dense.ppl), -(dense.fact_acc - metrics["fact_acc"])]
    if config.knowledge_weight is not None:
        values.append(knowledge_objective(metrics, env, config.knowledge_metric))
    values += [float(reward_term(name)(metrics, allocation, env)) for name in config.terms]
    return np.array(values, dtype=np.float64)


def scalar_quality(metrics: dict, allocation: list[float], env, config: RewardConfig) -> float:
    """quality() plus the weighted user terms: the scalar reward's final value."""
    dense = env.reference
    base = quality(metrics["ppl"], metrics["fact_acc"], dense.ppl, dense.fact_acc, config)
    if config.knowledge_weight is not None:
        base += config.knowledge_weight * knowledge_objective(metrics, env, config.knowledge_metric)
    return base + _terms(metrics, allocation, env, config)


def _terms(metrics: dict, allocation: list[float], env, config: RewardConfig) -> float:
    return sum(w * float(reward_term(name)(metrics, allocation, env)) for name, w in config.terms.items())


def check_knowledge_reference(reference, metric: str = KNOWLEDGE_METRICS[0]) -> None:
    """Refuse a knowledge reward whose dense reference cannot define it (checked when the env is built): the
    dense `metric` unknown (NaN, e.g. a surrogate data set without per-fact records) or a dense model that
    answers none of the env's facts (every pruned model would read 0; the answer perplexity scores every
    fact's right answer whether the model gives it or not, so it needs none answered)."""
    if math.isnan(getattr(reference, metric)):
        raise ValueError(f"the knowledge reward needs the dense model's {metric}, which this env does not know "
                         f"(NaN): use the exact or proxy fidelity, or a surrogate data set built with per-fact records")
    if metric in LOWER_IS_BETTER:
        return
    if not reference.retention_by_relation or not getattr(reference, metric) > 0.0:
        raise ValueError("the knowledge reward needs facts the dense model answers greedy-exact, and it answers "
                         "none of this env's facts: use other facts (data.facts, data.n_facts) or drop the knowledge "
                         "reward (preference_range, reward.knowledge_weight)")


def knowledge_objective(metrics: dict, env, metric: str = KNOWLEDGE_METRICS[0]) -> float:
    """metric / dense metric - 1: 0 for the dense model (it keeps all it knows), -1 when it keeps nothing; for
    the answer perplexity -log(metric / dense metric), unbounded below like the perplexity objective."""
    check_knowledge_reference(env.reference, metric)
    value = float(metrics[metric])
    if math.isnan(value):
        raise ValueError(f"{metric} is NaN at the end of this episode: the knowledge reward cannot be computed (a "
                         f"fidelity without the balanced knowledge metric); use the exact or proxy fidelity")
    dense = getattr(env.reference, metric)
    return -math.log(value / dense) if metric in LOWER_IS_BETTER else value / dense - 1.0


def check_preference(value, name: str = "preference") -> float:
    """A preference w in [0, 1]: the weight of the knowledge objective against perplexity."""
    return float(check_number(name, value, low=0.0, high=1.0))


def check_preference_range(value) -> tuple[float, float] | None:
    """None (no preference conditioning) or a pair (lo, hi) with 0 <= lo <= hi <= 1."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"preference_range={value!r} must be None or a pair (lo, hi) of preferences in [0, 1]")
    lo, hi = (check_preference(v, "preference_range") for v in value)
    if lo > hi:
        raise ValueError(f"preference_range={tuple(value)!r} must satisfy lo <= hi")
    return lo, hi


def preference_configs(config: RewardConfig, preference_range: tuple[float, float] | None
                       ) -> tuple[RewardConfig, RewardConfig]:
    """(the env's reward config, the fidelity's): `config` twice without preference conditioning; with it the
    vector gains "knowledge" and a surrogate's spread (`surrogate_std`) is the log-ppl one alone (the
    knowledge objective's is `surrogate_knowledge_std`)."""
    if preference_range is None:
        return config, config
    if (config.ppl_weight, config.fact_weight, config.knowledge_weight) != (1.0, 1.0, None):
        raise ValueError("preference_range sets the reward's trade-off itself: leave reward.ppl_weight, fact_weight "
                         "and knowledge_weight at their defaults (1, 1, None)")
    return replace(config, knowledge_weight=0.0), replace(config, fact_weight=0.0)


def draw_preference(preference_range: tuple[float, float] | None, options: dict, np_random) -> float | None:
    """The episode's preference: reset's option "preference", else a draw from the range (None: off)."""
    if preference_range is None:
        if "preference" in options:
            raise ValueError("reset option 'preference' needs an env built with preference_range=(lo, hi)")
        return None
    if "preference" in options:
        return check_preference(options["preference"])
    return float(np_random.uniform(*preference_range))


def preference_quality(metrics: dict, allocation: list[float], env, config: RewardConfig, preference: float,
                       ppl_pessimism: float = 0.0, knowledge_pessimism: float = 0.0) -> float:
    """(1 - w) * (-log(ppl / ppl_dense) - ppl_pessimism) + w * (knowledge_objective - knowledge_pessimism)
    + the user terms.

    w = `preference` is the share of the knowledge objective; ppl_weight and fact_weight do not apply.
    Both objectives are 0 for the dense model; the ppl one is unbounded below (about -1.6 to -2.1 at 60 %
    sparsity on SmolLM2-135M). The retention and accuracy objectives lie in [-1, 0], so losing every known
    fact costs as much as an e-fold perplexity at w = 0.5, and w must be near 1 before retention outweighs
    perplexity; the answer-perplexity one is in the ppl objective's units and falls about 5x as fast
    (-3.2 to -3.9 nats per answer token at 50 % against -0.6 to -0.7 for the text).
    The pessimisms lower each objective (a surrogate's lower confidence bound)."""
    ppl = -math.log(metrics["ppl"] / env.reference.ppl) - ppl_pessimism
    knowledge = knowledge_objective(metrics, env, config.knowledge_metric) - knowledge_pessimism
    return (1.0 - preference) * ppl + preference * knowledge + _terms(metrics, allocation, env, config)
