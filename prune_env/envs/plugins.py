"""Extension points that need no edit of the package: reward terms and observation features by name.

    register_reward_term("spread", lambda metrics, allocation, env: -float(np.var(allocation)))
    env = gym.make("prune_env/LayerPrune-v0", reward={"terms": {"spread": 0.5}})

    register_observation_feature("first_half", lambda env, unit: float(unit < len(env.units) / 2))
    env = gym.make("prune_env/LayerPrune-v0", extra_features=["first_half"])

Both see the episode through the env's public views, never through the weights, so they are correct on
every fidelity (the surrogate never prunes a weight): `env.allocation` (per-unit ratios so far),
`env.profile` (z-scores and numel per unit), `env.reference` (dense metrics), `env.units`,
`env.target_sparsity`.

Pruning methods have their own registry (`prune_env.register_method`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (metrics of the pruned model: ppl, fact_acc, fact_nll, fact_retention, achieved_sparsity (+ surrogate_std);
#  the episode's per-unit allocation; the unwrapped env: env.reference is the dense Metrics) -> one number,
#  higher is better
RewardTermFn = Callable[[dict, list, Any], float]
# (the unwrapped env, the index of the unit being described) -> one number (clipped to [-10, 10])
ObservationFeatureFn = Callable[[Any, int], float]

_REWARD_TERMS: dict[str, RewardTermFn] = {}
_FEATURES: dict[str, ObservationFeatureFn] = {}


def _register(table: dict, kind: str, name: str, fn: Callable) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name {name!r} must be a non-empty string")
    if not callable(fn):
        raise ValueError(f"{kind} {name!r} must be callable, got {fn!r}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered: choose another name")
    table[name] = fn


def _lookup(table: dict, kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}: registered are {sorted(table)} "
                         f"(add one with prune_env.register_{kind.replace(' ', '_')})")
    return table[name]


def register_reward_term(name: str, fn: RewardTermFn) -> None:
    """Make `reward={"terms": {name: weight}}` add weight * fn(metrics, allocation, env) to the reward.

    Args:
        name: the term's name, new and non-empty (a second registration of a name is refused).
        fn: (metrics dict of the pruned model, the per-unit allocation, the unwrapped env) -> float, higher
            is better; called at the episode's end on every fidelity.

    Raises:
        ValueError: the name is empty or taken, or `fn` is not callable.
    """
    _register(_REWARD_TERMS, "reward term", name, fn)


def reward_term(name: str) -> RewardTermFn:
    return _lookup(_REWARD_TERMS, "reward term", name)


def register_observation_feature(name: str, fn: ObservationFeatureFn) -> None:
    """Make `extra_features=[name]` append fn(env, unit_index) to each observation.

    Args:
        name: the feature's name, new and non-empty.
        fn: (the unwrapped env, the index of the unit being described) -> float; the value is clipped to
            [-10, 10] like the rest of the observation.

    Raises:
        ValueError: the name is empty or taken, or `fn` is not callable.
    """
    _register(_FEATURES, "observation feature", name, fn)


def observation_feature(name: str) -> ObservationFeatureFn:
    return _lookup(_FEATURES, "observation feature", name)
