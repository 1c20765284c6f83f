"""What both pruning environments share: context ownership, the episode target, reset options, render, close.

The target keeps one name on its way: `target_sparsity` in the constructor, in reset's options, in
`info` and as the attribute `env.target_sparsity` (the current episode's target; the constructor's
until the first reset).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from ..context import DataConfig, Metrics, PruningContext
from .fidelities import SurrogateContext, surrogate_context
from .plugins import observation_feature
from .rendering import render_allocation
from .rewards import RewardConfig
from ..validation import check_number, check_target

Z_CLIP = 10.0
RESET_OPTIONS = ("target_sparsity", "target_sparsity_range")


@dataclass(frozen=True)
class Profile:
    """The dense sensitivity profile, one entry per unit (z-scores across units; numel = prunable weights)."""

    units: list[str]
    z_wanda: list[float]
    z_grad: list[float]
    numel: list[int]


def check_target_range(value, low: float, high: float) -> tuple[float, float] | None:
    """None or a (lo, hi) pair with low <= lo <= hi <= high, each a target in (0, 1)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"target_sparsity_range={value!r} must be a pair (lo, hi) of targets in (0, 1)")
    lo, hi = (check_target(v, "target_sparsity_range") for v in value)
    if not low <= lo <= hi <= high:
        raise ValueError(f"target_sparsity_range={tuple(value)!r} must satisfy {low} <= lo <= hi <= {high}")
    return lo, hi


class PruneEnvBase(gym.Env):
    """Base of LayerPruneEnv and IterativePruneEnv (not an environment by itself)."""

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    reward_mode = "scalar"  # LayerPrune also offers "vector" (one reward per objective, see `reward_space`)
    reset_options = RESET_OPTIONS  # LayerPrune adds "preference" (read by its own reset)

    def _setup(self, *, unknown: dict, target_sparsity, target_sparsity_range, target_bounds: tuple[float, float],
               render_mode: str | None, reward: dict | None, context: PruningContext | SurrogateContext | None,
               context_args: dict, fidelity: str = "exact", surrogate: str | None = None) -> None:
        """Checks shared by both constructors, then the context: the lent one, or a new one this env owns.

        A surrogate env (`fidelity == "surrogate"`) whose data set describes its units owns a light
        `SurrogateContext` read from the data set header: no model is loaded. A `SurrogateContext` lent to
        an env that needs weights stands for the model-backed context it describes, which the env builds
        and owns (e.g. to replay a surrogate env's allocations exactly)."""
        if unknown:
            valid = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")]
            raise ValueError(f"unknown option(s) {sorted(unknown)} for {type(self).__name__}: "
                             f"valid options are {valid}")
        self._target_bounds = target_bounds
        self._default_target = self._check_episode_target(target_sparsity)
        self._default_range = check_target_range(target_sparsity_range, *target_bounds)
        self.target_sparsity = self._default_target
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}: use 'ansi' or 'rgb_array'")
        self.render_mode = render_mode
        self.reward_config = RewardConfig.from_dict(reward)
        if context is not None and not isinstance(context, (PruningContext, SurrogateContext)):
            raise ValueError(f"context={context!r} is not a PruningContext: pass one or leave it None")
        self._owns_context, self._released = context is None, False
        surrogate_env = fidelity == "surrogate"
        if isinstance(context, SurrogateContext) and not surrogate_env:
            context, self._owns_context = context.pruning_context(), True
        if context is None and surrogate_env:
            context = surrogate_context(surrogate, **context_args)
        if context is None:
            data = context_args.pop("data")
            context = PruningContext(**context_args, data=DataConfig.from_dict(data))
        self.context = context
        self.units = context.units
        self.unit_names = [unit.name for unit in self.units]

    def _set_features(self, names: list[str] | None) -> None:
        """Registered observation features by name (checked now; looked up when observed, so the env pickles)."""
        self.extra_features = list(names or [])
        for name in self.extra_features:
            observation_feature(name)

    def _feature_values(self, index: int) -> list[float]:
        """fn(env, unit index) of each extra feature; `env.allocation` and `env.profile` work on every fidelity."""
        return [float(check_number(f"observation feature {name!r}", observation_feature(name)(self, index)))
                for name in self.extra_features]

    def _check_episode_target(self, target) -> float:
        target = check_target(target)
        low, high = self._target_bounds
        if target > high:
            raise ValueError(f"target_sparsity {target} is above max_sparsity {high}: no allocation can reach it; "
                             f"lower the target or raise max_sparsity")
        if target < low:
            raise ValueError(f"target_sparsity {target} is below min_sparsity {low}: no allocation can reach it; "
                             f"raise the target or lower min_sparsity")
        return target

    def _reset_target(self, seed: int | None, options: dict | None) -> float:
        """Seeds np_random and sets the episode's target: the option, a draw from the range, or the default."""
        gym.Env.reset(self, seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.reset_options))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}: valid options are {list(self.reset_options)}")
        if "target_sparsity" in options and "target_sparsity_range" in options:
            raise ValueError("give reset either target_sparsity or target_sparsity_range, not both")
        if "target_sparsity" in options:
            target = self._check_episode_target(options["target_sparsity"])
        else:
            span = (check_target_range(options["target_sparsity_range"], *self._target_bounds)
                    if "target_sparsity_range" in options else self._default_range)
            target = self._default_target if span is None else float(self.np_random.uniform(*span))
        self.target_sparsity = target
        return target

    # -- public, documented views ------------------------------------------------------------------
    @property
    def profile(self) -> Profile:
        """The dense sensitivity profile of the units (what the observations' z_wanda / z_grad come from)."""
        ctx = self.context
        return Profile(list(self.unit_names), list(ctx.z_wanda), list(ctx.z_grad), [u.numel for u in self.units])

    @property
    def reference(self) -> Metrics:
        """The dense model's metrics on the slices this env's reward uses."""
        return self._reference

    # -- Gymnasium API -----------------------------------------------------------------------------
    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode: pass render_mode='ansi' or 'rgb_array'")
            return None
        return render_allocation(self.unit_names, self._allocation(), self._render_z_wanda(), self.context.z_grad,
                                 self.target_sparsity, self.render_mode)

    def __getstate__(self) -> dict:
        """A surrogate env on its light context pickles (Ray, subprocesses); a model-backed one refuses clearly."""
        if not isinstance(self.context, SurrogateContext):
            raise TypeError(f"this {type(self).__name__} holds a model and open files and does not pickle: send "
                            f"its constructor arguments instead (e.g. prune_env.envs.factory.make_env in each worker)")
        return self.__dict__

    @property
    def allocation(self) -> list[float]:
        """The episode's per-unit ratios so far (0 for units not decided yet): what reward terms and
        observation features read instead of the weights (correct on every fidelity)."""
        return self._allocation()

    def close(self):
        """A lent context goes back dense; an owned one is restored and its memory and files released."""
        if self._released:
            return
        self.context.restore()
        if self._owns_context:
            self.context.release()
            self._released = True

    def _render_z_wanda(self) -> list[float]:
        return list(self.context.z_wanda)

    def _allocation(self) -> list[float]:
        raise NotImplementedError


def clip_observation(values: list[float]) -> np.ndarray:
    """float32 observation, non-finite entries mapped to the bounds, everything clipped to [-10, 10]."""
    array = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=Z_CLIP, posinf=Z_CLIP, neginf=-Z_CLIP)
    return np.clip(array, -Z_CLIP, Z_CLIP).astype(np.float32)


def check_whole(name: str, value, low: int) -> int:
    return int(check_number(name, value, low=low, integer=True))
