"""A black-box search baseline: CMA-ES or random search over allocations, with a hard budget of env episodes.

What learning adds over search is only measurable at the same cost, so this agent gets a number of
LayerPrune-v0 episodes (`episodes`, e.g. as many exact episodes as an RL policy consumed in training)
and returns the best allocation it played::

    agent = build_agent({"name": "search", "optimizer": "cmaes", "episodes": 64, "sigma0": 0.1})
    ratios = agent.allocate(ctx, 0.5, seed=0)

Search space: one unconstrained value z_u per unit; a candidate is
`match_budget(target + z, numel, target, min_sparsity, max_sparsity)` (one shift and a clip), so every
candidate meets the parameter-weighted target exactly and z = 0 is the uniform allocation, the
search's starting mean. A candidate's fitness is the env's terminal `info["quality"]` (the scalar
reward without shaping) of ONE episode played on the caller's context. Uniform is always the first
episode; the budget is a hard cap (a CMA-ES generation cut short by it is evaluated but not told).
The best played allocation wins, ties to the earliest, so the result is never worse than uniform on
the search's own reward. The seed drives every random draw (CMA-ES samples through a
`numpy.random.Generator`, never numpy's global state), so a seed gives the same allocation again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from agents.rules import match_budget
from agents.base import Agent, play_allocation
from prune_env.config_files import dataclass_from_dict
from prune_env.envs.factory import ENV_ID, make_env
from prune_env.validation import check_number

if TYPE_CHECKING:  # pragma: no cover
    from prune_env.context import PruningContext

__all__ = ["OPTIMIZERS", "SearchAgent", "SearchConfig", "SearchResult", "search_allocation"]

OPTIMIZERS = ("cmaes", "random")
# env options the agent sets itself, or that a lent context ignores: refused in `env` rather than dropped
RESERVED_ENV_KEYS = ("context", "target_sparsity", "target_sparsity_range", "fidelity", "model", "device", "dtype",
                     "granularity", "method", "pattern", "data")

Evaluate = Callable[[list[float]], tuple[float, list[float]]]
"""candidate allocation -> (quality, the allocation as played); one call is one env episode."""


@dataclass(frozen=True)
class SearchConfig:
    """The search agent's keys: optimiser, budget of episodes, env fidelity, initial step, env options."""

    optimizer: Literal["cmaes", "random"] = "cmaes"
    episodes: int = 32
    fidelity: Literal["exact", "proxy", "surrogate"] = "exact"
    sigma0: float = 0.1  # std of the per-unit offset z, in sparsity units, before the budget shift
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number("episodes", self.episodes, low=1, integer=True)
        check_number("sigma0", self.sigma0, low=0.0, high=1.0, low_open=True)
        reserved = sorted(set(self.env) & set(RESERVED_ENV_KEYS))
        if reserved:
            raise ValueError(f"env={dict(self.env)!r} sets {reserved}: the search agent sets the target and lends "
                             f"its context, and takes the fidelity from its own 'fidelity' key; remove them")


@dataclass
class SearchResult:
    """The outcome of one search: the best played allocation and what the budget bought."""

    allocation: list[float]
    quality: float
    uniform_quality: float
    best_episode: int  # 0 = uniform
    qualities: list[float]  # one per episode, in play order

    @property
    def episodes(self) -> int:
        return len(self.qualities)


def search_allocation(evaluate: Evaluate, numel: list[int], target: float, low: float, high: float,
                      config: SearchConfig, seed: int) -> SearchResult:
    """Spend exactly `config.episodes` calls of `evaluate` (uniform first) and keep the best allocation."""
    seed = int(check_number("seed", seed, low=0, integer=True))
    rng = np.random.default_rng(seed)
    n = len(numel)

    def candidate(z: np.ndarray) -> list[float]:
        return match_budget(target + np.asarray(z, dtype=np.float64), numel, target, low, high)

    qualities: list[float] = []
    best: tuple[float, list[float], int] | None = None

    def play_one(z: np.ndarray) -> float:
        """One episode; returns the loss to minimise (non-finite qualities rank last)."""
        nonlocal best
        quality, played = evaluate(candidate(z))
        quality = float(quality)
        qualities.append(quality)
        score = quality if math.isfinite(quality) else -math.inf
        if best is None or score > best[0]:
            best = (score, [float(r) for r in played], len(qualities) - 1)
        return -score if math.isfinite(score) else 1e12

    play_one(np.zeros(n))  # uniform: the first episode and the search's starting mean
    if config.optimizer == "random":
        while len(qualities) < config.episodes:
            play_one(rng.normal(0.0, config.sigma0, n))
    else:
        import cma

        options = {"seed": math.nan, "randn": lambda *shape: rng.standard_normal(shape), "verbose": -9,
                   "verb_disp": 0, "verb_log": 0}
        strategy = cma.CMAEvolutionStrategy(np.zeros(n), config.sigma0, options)
        while len(qualities) < config.episodes:
            population = strategy.ask()
            left = config.episodes - len(qualities)
            losses = [play_one(z) for z in population[:left]]
            if len(losses) == len(population):
                strategy.tell(population, losses)
    _, allocation, index = best
    return SearchResult(allocation, qualities[index], qualities[0], index, qualities)


class SearchAgent(Agent):
    """CMA-ES or random search over budget-matched allocations, `episodes` LayerPrune-v0 episodes per allocate.

    The episodes are played on the caller's context (`context=ctx`, lent: the env prunes ctx's model and
    the agent restores it dense afterwards) with `fidelity` and the extra env options `env`
    (min_sparsity, max_sparsity, reward, proxy sizes, surrogate ...). `last_info["search"]` records the
    optimiser, episodes played, the best and the uniform allocation's quality.
    """

    name = "search"
    deterministic = False  # the seed drives the search; the same seed gives the same allocation
    plays_env = True  # plays LayerPrune episodes on the context it is lent

    def __init__(self, optimizer: str = "cmaes", episodes: int = 32, fidelity: str = "exact", sigma0: float = 0.1,
                 env: dict | None = None):
        super().__init__()
        self.config = dataclass_from_dict(SearchConfig, {"optimizer": optimizer, "episodes": episodes,
                                                         "fidelity": fidelity, "sigma0": sigma0,
                                                         "env": {} if env is None else env}, "search")
        self._env = None

    def _env_for(self, ctx: "PruningContext", target: float):
        """One env per lent context (building an exact env records the dense activations once)."""
        if self._env is None or self._env.unwrapped.context is not ctx:
            self._env = make_env(ENV_ID, rescale=False, context=ctx, target_sparsity=float(target),
                                 fidelity=self.config.fidelity, **self.config.env)
        return self._env

    def allocate(self, ctx: "PruningContext", target: float, seed: int) -> list[float]:
        env = self._env_for(ctx, target)
        unwrapped = env.unwrapped

        def evaluate(allocation: list[float]) -> tuple[float, list[float]]:
            info = play_allocation(env, allocation, target=target)
            return float(info["quality"]), list(info["allocation"])

        try:
            result = search_allocation(evaluate, [unit.numel for unit in unwrapped.units], float(target),
                                       unwrapped.min_sparsity, unwrapped.max_sparsity, self.config, seed)
        finally:
            ctx.restore()  # the lent model goes back dense
        self.last_info = {"search": {"optimizer": self.config.optimizer, "fidelity": self.config.fidelity,
                                     "episodes": result.episodes, "best_episode": result.best_episode,
                                     "best_quality": result.quality, "uniform_quality": result.uniform_quality}}
        return result.allocation
