"""Stable-Baselines3 policies trained by train.py, used as pruning agents.

A saved policy is the SB3 zip (`final_model.zip` or a checkpoint's `model.zip`) with the run's
config.yaml beside it or up to two folders above it (checkpoints live in run_dir/checkpoints/step_N/).
It is loaded without unpickling anything (training/safe_load.py): the algorithm and policy are rebuilt
from config.yaml in the spaces of the env it will play, and only tensors are read from the zip::

    agent = RLAgent("runs/ppo-0")                 # a run folder or a policy zip
    ratios = agent.allocate(ctx, 0.5, seed=0)     # one deterministic LayerPrune-v0 episode on ctx's model

Observation feature 8 (`last_drop`) is 0 in proxy episodes but measured in exact ones; a policy
trained on proxy never saw it vary, so when it plays an exact env the feature is zeroed: the policy
sees exactly the features it was trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from agents.base import Agent
from training.safe_load import NormalizerStats, build_model, load_normalizer, load_parameters
from training.train_config import DEFAULTS, TrainConfig, config_from_dict
from prune_env.config_files import ConfigError, load_config, merge, read_yaml
from prune_env.envs.factory import make_env
from prune_env.envs.rewards import KNOWLEDGE_METRICS, check_preference

if TYPE_CHECKING:  # pragma: no cover
    from prune_env.context import PruningContext

CONFIG_NAME = "config.yaml"
FINAL_MODEL = "final_model.zip"
LAST_DROP = 8  # observation index of last_drop (see LayerPruneEnv's docstring)

__all__ = ["RLAgent", "SavedPolicy", "find_config", "load_policy", "rollout_policy", "resolve_policy_path"]


def resolve_policy_path(path: str | Path) -> Path:
    """A policy zip; a run folder stands for its final_model.zip."""
    path = Path(path)
    if path.is_dir():
        path = path / FINAL_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"no saved policy at {str(path)!r}: give a run folder or a .zip saved by train.py")
    return path


def find_config(policy_path: str | Path) -> Path:
    """config.yaml beside the policy or up to two folders above it (checkpoints/step_N/model.zip)."""
    policy_path = Path(policy_path)
    for folder in [policy_path.parent, *list(policy_path.parent.parents)[:2]]:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise FileNotFoundError(f"no {CONFIG_NAME} beside {str(policy_path)!r} or in the two folders above it: "
                            "the policy must come from train.py's run folder")


def read_run_config(policy_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig saved with a policy (YAML, safe loader), with key=value overrides applied before the
    checks (e.g. the devices of the machine that plays it); keys an older run did not save take defaults."""
    path = find_config(resolve_policy_path(policy_path))
    saved = read_yaml(path, "the run's config")
    try:
        return config_from_dict(load_config(None, overrides, merge(DEFAULTS, saved)))
    except ConfigError as error:
        raise ConfigError(f"{str(path)!r}: {error}") from None


@dataclass
class SavedPolicy:
    """A trained policy rebuilt from its run: the SB3 model, its config and observation statistics."""

    path: Path
    config: TrainConfig
    model: Any
    normalizer: NormalizerStats | None

    def rollout(self, env, seed: int | None = None, target: float | None = None,
                deterministic: bool = True, preference: float | None = None) -> dict[str, Any]:
        """One episode (see `rollout_policy`); deterministic unless asked to sample the policy's actions."""
        return rollout_policy(self.model, env, train_fidelity=self.config.env.fidelity,
                              normalize=self.normalizer.normalize_obs if self.normalizer is not None else None,
                              seed=seed, target=target, deterministic=deterministic, preference=preference)


def load_policy(path: str | Path, env, device: str = "cpu", trust_pickle: bool = False) -> SavedPolicy:
    """The policy saved at `path` (a zip or run folder), rebuilt in `env`'s spaces on `device` (whatever
    device it trained on); nothing is unpickled."""
    policy_path = resolve_policy_path(path)
    config = read_run_config(policy_path, [f"algo.device={device}", f"env.device={device}"])
    check_compatible(config, env)
    model = build_model(config, env, seed=None, device=device)
    load_parameters(model, policy_path)
    return SavedPolicy(policy_path, config, model, load_normalizer(policy_path.parent, trust_pickle))


def check_compatible(config: TrainConfig, env) -> None:
    """Fail with an explanation when the env does not act and observe as the policy's training env did."""
    unwrapped = env.unwrapped
    if unwrapped.action_type != config.env.action_type:
        raise ValueError(f"the policy was trained with action_type={config.env.action_type!r} but the env has "
                         f"{unwrapped.action_type!r}: use the training action_type")
    if unwrapped.action_mode != config.env.action_mode:
        raise ValueError(f"the policy was trained with action_mode={config.env.action_mode!r} but the env has "
                         f"{unwrapped.action_mode!r}: use the training action_mode")
    if config.env.action_type == "discrete" and unwrapped.action_space.n != config.env.n_actions:
        raise ValueError(f"the policy picks one of {config.env.n_actions} actions but the env has "
                         f"{unwrapped.action_space.n}: use n_actions={config.env.n_actions}")
    if unwrapped.context.granularity != config.env.granularity:
        raise ValueError(f"the policy was trained on granularity={config.env.granularity!r} but the env prunes "
                         f"{unwrapped.context.granularity!r}: use the training granularity")


def policy_observation(obs: np.ndarray, env, train_fidelity: str,
                       normalize: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The observation as the policy saw it in training (last_drop zeroed when trained on proxy)."""
    obs = np.array(obs, dtype=np.float32, copy=True)
    if train_fidelity == "proxy" and env.unwrapped.fidelity != "proxy":
        obs[LAST_DROP] = 0.0
    return normalize(obs).astype(np.float32) if normalize is not None else obs


def rollout_policy(model, env, *, train_fidelity: str = "proxy", normalize: Callable | None = None,
                   seed: int | None = None, target: float | None = None, deterministic: bool = True,
                   preference: float | None = None) -> dict[str, Any]:
    """One episode of `model` on a LayerPrune env (its mean actions, or sampled ones with
    deterministic=False: what the policy visits in training); the final info plus reward and timing.
    `preference`: the episode's w on an env with preference_range (None: the env draws it from its range)."""
    if env.observation_space.shape != model.observation_space.shape:
        raise ValueError(f"the policy observes shape {model.observation_space.shape} but the env gives "
                         f"{env.observation_space.shape}: use the training granularity, model family and "
                         f"preference_range")
    started = time.time()
    options = {"target_sparsity": float(target)} if target is not None else {}
    if preference is not None:
        options["preference"] = float(preference)
    obs, _ = env.reset(seed=seed, options=options or None)
    total, steps, done, info = 0.0, 0, False, {}
    while not done:
        action, _ = model.predict(policy_observation(obs, env, train_fidelity, normalize), deterministic=deterministic)
        obs, reward, terminated, truncated, info = env.step(action)
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
    unwrapped = env.unwrapped
    return {"reward": total, "quality": float(info["quality"]), "ppl": float(info["ppl"]),
            "fact_acc": float(info["fact_acc"]), "fact_nll": float(info["fact_nll"]),
            "fact_retention": float(info["fact_retention"]), "achieved_sparsity": float(info["achieved_sparsity"]),
            "dense_ppl": float(unwrapped.reference.ppl), "dense_fact_acc": float(unwrapped.reference.fact_acc),
            "target_sparsity": float(info["target_sparsity"]), "allocation": [float(r) for r in info["allocation"]],
            "steps": steps, "seconds": time.time() - started,
            **{key: float(info[key]) for key in (*KNOWLEDGE_METRICS, "preference") if key in info}}


class RLAgent(Agent):
    """A policy saved by train.py as an `Agent`: one deterministic LayerPrune-v0 episode per allocation.

    The episode runs on the caller's model (`context=ctx`: the ctx is lent for the episode and its dense
    weights are restored afterwards) with the policy's training env options (action_type, n_actions,
    min/max sparsity, fidelity, proxy sizes, reward), overridden by `env`, e.g. `{fidelity: exact}`. A policy
    trained on the surrogate plays on the proxy fidelity: its observations are the same (the dense profile,
    last_drop 0) and it works on any model data, where a surrogate serves only the data set it was fitted on.
    `policy`: `device` (default cpu) and `trust_pickle` (read a pickled vecnormalize.pkl of an older run).
    `preference`: the w in [0, 1] every episode plays at, required by a policy trained with preference_range
    and refused by one trained without; the default name then shows it (`rl:<stem>@w=0.7`).
    """

    name = "rl"
    deterministic = True  # a fixed policy acting deterministically in a seed-independent env
    plays_env = True  # plays LayerPrune on the context it is lent
    POLICY_OPTIONS = ("device", "trust_pickle")
    # what the lent context decides, and the training-time target draw (the benchmark names the target)
    CONTEXT_KEYS = ("model", "device", "dtype", "granularity", "method", "pattern", "data", "target_sparsity_range")

    def __init__(self, path: str, env: dict | None = None, policy: dict | None = None,
                 preference: float | None = None):
        super().__init__()
        if not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"rl agent needs the path of a saved policy, got {path!r}")
        for what, value in (("env", env), ("policy", policy)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"rl {what} options must be a mapping, got {value!r}")
        unknown = sorted(set(policy or {}) - set(self.POLICY_OPTIONS))
        if unknown:
            raise ValueError(f"unknown rl policy option(s) {unknown}: valid options are {list(self.POLICY_OPTIONS)}")
        self.preference = None if preference is None else check_preference(preference)
        self.path = str(path)
        self.name = f"rl:{Path(self.path).stem}" + ("" if preference is None else f"@w={self.preference:g}")
        self.env_options, self.policy_options = dict(env or {}), dict(policy or {})
        self._env = None
        self._policy: SavedPolicy | None = None

    def _env_for(self, ctx: "PruningContext", target: float):
        """One env per lent context, with the policy's training options (the model comes from ctx)."""
        if self._env is not None and self._env.unwrapped.context is ctx:
            return self._env
        device = self.policy_options.get("device", "cpu")
        config = read_run_config(self.path, [f"algo.device={device}", f"env.device={device}"])
        kwargs = {key: value for key, value in config.env_kwargs().items() if key not in self.CONTEXT_KEYS}
        if (kwargs["preference_range"] is None) != (self.preference is None):
            raise ValueError(f"the policy at {self.path!r} was trained with preference_range="
                             f"{kwargs['preference_range']} but the agent has preference={self.preference}: give the "
                             f"agent a preference w in [0, 1] exactly when its policy was trained with a range")
        if kwargs["fidelity"] == "surrogate":  # the same observations (dense profile, last_drop 0) on any data:
            kwargs.update(fidelity="proxy", surrogate=None, surrogate_pessimism=0.0)  # a surrogate serves only its own
        self._env = make_env(**{**kwargs, **self.env_options, "target_sparsity": float(target)}, context=ctx)
        return self._env

    def allocate(self, ctx: "PruningContext", target: float, seed: int) -> list[float]:
        env = self._env_for(ctx, target)
        if self._policy is None:
            self._policy = load_policy(self.path, env, **self.policy_options)
        try:
            result = self._policy.rollout(env, seed=seed, target=float(target), preference=self.preference)
        finally:
            env.unwrapped.context.restore()  # the lent model goes back dense
        self.last_info = {"rl": {"policy": str(self._policy.path), "algo": self._policy.config.algo.name,
                                 "trained_model": self._policy.config.env.model,
                                 "fidelity": env.unwrapped.fidelity}}
        if self.preference is not None:
            self.last_info["rl"]["preference"] = self.preference
        return list(result["allocation"])
