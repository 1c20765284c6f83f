"""The one agent interface, the agent registry, and the helpers every agent shares.

An agent turns a pruning context (one loaded model with its units, calibration statistics and
sensitivity profile) and a global target sparsity into an *allocation*: one sparsity ratio per unit
whose parameter-weighted mean equals the target. Every agent subclasses `Agent`::

    class MyAgent(Agent):
        name = "mine"
        def allocate(self, ctx: PruningContext, target: float, seed: int) -> list[float]: ...

`Agent` also gives every agent `deterministic` (the allocation does not depend on `seed`, so the
benchmark computes one seed and copies it), `last_info` (extra record fields of the last `allocate`)
and `configure(env_data=..., workdir=...)` (called once before any `allocate`: the env's reward data
for agents that play an env, a folder for their own files), so callers never probe for attributes.

The allocation is applied by whoever asked for it: `ctx.prune(allocation)` (the exact sequential
prune, what the benchmark does) or `play_allocation(env, allocation)` through LayerPrune-v0 (the env's action
wall keeps the budget exact to one weight per unit). Agents that play envs themselves (rl, the
iterative llm, search) lend the `ctx` they are given to the env (`context=ctx`) and hand it back dense.

Agents are built from YAML-style dicts by `build_agent`::

    build_agent({"name": "owl", "lam": 0.08, "m": 5})
    build_agent({"name": "rl", "path": "runs/ppo/model.zip", "label": "ppo-block"})

Every agent accepts `label` (the name it is reported under; defaults to the registry name, for RL
policies to `rl:<file stem>`). Unknown names or parameters raise ValueError listing the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from prune_env.context import PruningContext

__all__ = ["AGENTS", "Agent", "build_agent", "budget_tolerance", "check_allocation",
           "play_allocation"]


class Agent:
    """The one agent interface: `allocate(ctx, target, seed)` returns one sparsity ratio per unit.

    Subclasses set `name` (the registry name; `build_agent` replaces it with the config's `label`)
    and override `allocate`. The rest has working defaults, so callers never probe for attributes:

    deterministic   True when the allocation does not depend on `seed` (the benchmark then computes
                    one seed and copies it to the others)
    plays_env       True when `allocate` plays an env on the context it is given (rl, llm, search):
                    the benchmark then lends a context built on the env's reward data, never the
                    held-out one
    last_info       extra fields of the last `allocate` for the result record (iterations, rollbacks)
    configure()     called once before any `allocate` with the env data (the reward slices) for
                    agents that play an env, and a folder for their own files (LLM transcripts)

    Attributes:
        name: the registry name, or the `label` the agent is reported under.
        deterministic: the allocation does not depend on `seed`.
        plays_env: `allocate` plays an env on the context it is lent.
        last_info: extra record fields of the last `allocate` (empty before the first).
        env_data: the env's reward data given to `configure`, or None.
        workdir: the folder given to `configure` for the agent's own files, or None.
    """

    name: str = "agent"
    deterministic: bool = True
    plays_env: bool = False  # True: allocate() plays an env on ctx, so ctx must carry the env's reward data

    def __init__(self) -> None:
        self.last_info: dict = {}
        self.env_data: dict | None = None
        self.workdir: Path | None = None

    def configure(self, env_data: dict | None = None, workdir: str | Path | None = None) -> None:
        """Called once before any `allocate` (the benchmark does), so no agent probes its caller.

        Args:
            env_data: the env's `data` dict (its reward slices), for agents that play an env; None otherwise.
            workdir: a folder for the agent's own files (the LLM agent's transcripts); None writes nothing.
        """
        self.env_data = dict(env_data) if env_data is not None else None
        self.workdir = Path(workdir) if workdir is not None else None

    def allocate(self, ctx: "PruningContext", target: float, seed: int) -> list[float]:
        """One sparsity per unit whose parameter-weighted mean is `target` (`check_allocation` checks it).

        Args:
            ctx: the model, its units (`ctx.units`, in order) and their sensitivity profile; an agent that
                plays an env lends it (`context=ctx`) and leaves it dense.
            target: the global target sparsity, in (0, 1).
            seed: the seed of this cell; a deterministic agent ignores it.

        Returns:
            One ratio in [0, 1) per unit of `ctx.units`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement allocate(ctx, target, seed)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------- registry

AGENTS: dict[str, str] = {
    "uniform": "agents.heuristics:UniformAgent",
    "owl": "agents.heuristics:OWLAgent",
    "alphapruning": "agents.heuristics:AlphaPruningAgent",
    "random": "agents.heuristics:RandomAgent",
    "zscore-greedy": "agents.heuristics:ZScoreGreedyAgent",
    "ramp": "agents.heuristics:RampAgent",
    "protect-first": "agents.heuristics:ProtectFirstAgent",
    "llm": "agents.llm:LLMAgent",
    "llm-trained": "agents.llm.trained:TrainedLLMAgent",
    "rl": "agents.rl:RLAgent",
    "search": "agents.search:SearchAgent",
    "replay": "agents.replay:ReplayAgent",
}
"""Registry name -> "module:Class". Classes are imported on first use (no torch import at load)."""


def _agent_class(name: str):
    module, _, attr = AGENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def agent_parameters(name: str) -> list[str]:
    """The parameters an agent accepts in its config dict (besides `name`)."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}: valid agents are {sorted(AGENTS)}")
    params = [p for p, spec in inspect.signature(_agent_class(name).__init__).parameters.items()
              if p != "self" and spec.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    return sorted(set(params) | {"label"})


def build_agent(config: dict) -> Agent:
    """An agent from a dict such as {"name": "owl", "lam": 0.08, "m": 5}."""
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, dict):
        raise ValueError(f"an agent config must be a mapping with a 'name', got {config!r}")
    params = dict(config)
    name = params.pop("name", None)
    if name is None:
        raise ValueError(f"agent config {config!r} has no 'name': valid agents are {sorted(AGENTS)}")
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}: valid agents are {sorted(AGENTS)}")
    valid = agent_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for agent {name!r}: valid parameters are {valid}")
    label = params.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"agent label must be a non-empty string, got {label!r}")
    try:
        agent = _agent_class(name)(**params)
    except TypeError as error:  # e.g. a missing required parameter
        raise ValueError(f"agent {name!r}: {error}; valid parameters are {valid}") from None
    if label is not None:
        agent.name = label
    return agent


# --------------------------------------------------------------------------- helpers


def budget_tolerance(ctx: "PruningContext") -> float:
    """Largest acceptable |weighted sparsity - target|: float noise, or one weight per unit for
    allocations that come back from an env (they are counted in whole weights)."""
    return max(1e-6, len(ctx.units) / ctx.total_numel)


def check_allocation(ctx: "PruningContext", allocation, target: float, who: str = "agent") -> list[float]:
    """Floats in [0, 1), one per unit, meeting the target within `budget_tolerance`; else ValueError."""
    try:
        values = [float(x) for x in allocation]
    except (TypeError, ValueError):
        raise ValueError(f"{who} returned {allocation!r}, not a list of numbers") from None
    if len(values) != len(ctx.units):
        raise ValueError(f"{who} returned {len(values)} ratios but the model has {len(ctx.units)} units")
    bad = [i for i, x in enumerate(values) if not (math.isfinite(x) and 0.0 <= x < 1.0)]
    if bad:
        raise ValueError(f"{who} returned ratios outside [0, 1) at units {bad[:5]}: {[values[i] for i in bad[:5]]}")
    achieved = ctx.weighted_sparsity(values)
    if abs(achieved - target) > budget_tolerance(ctx):
        raise ValueError(f"{who} allocation has parameter-weighted sparsity {achieved:.6f}, not the target {target}")
    return values


def play_allocation(env, allocation, *, target: float | None = None, seed: int | None = None) -> dict:
    """Play a full allocation through LayerPrune-v0 and return the final step's info.

    Each unit asks for its ratio through `env.unwrapped.action_for_ratio`; the env's wall projects it
    so the episode ends exactly on the target (so a ratio may be changed where the allocation does not
    meet the env's target or bounds). `target` resets the env to that target first.
    """
    u = env.unwrapped
    n = len(u.units)
    values = [float(x) for x in allocation]
    if len(values) != n:
        raise ValueError(f"allocation has {len(values)} ratios but the env has {n} units")
    env.reset(seed=seed, options=None if target is None else {"target_sparsity": float(target)})
    info: dict = {}
    terminated = False
    for ratio in values:
        _, _, terminated, truncated, info = env.step(u.action_for_ratio(ratio))
        if truncated:
            break
    if not terminated:
        raise RuntimeError("the env did not terminate after one step per unit")
    return dict(info)
