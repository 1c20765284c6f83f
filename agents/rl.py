"""Stable-Baselines3 policies trained on LayerPrune-v0 (by ``train.py``) used as pruning agents.

A saved policy is the SB3 zip (``final_model.zip`` or a checkpoint's ``model.zip``) with the resolved
training config (``config.yaml``) beside it or in a parent folder (checkpoints live in
``run_dir/checkpoints/step_N/``). The agent plays one deterministic episode of the env it is given and
returns the per-unit allocation the env applied (after the env's budget wall)::

    agent = RLPolicyAgent("runs/ppo-0/final_model.zip")
    ratios = agent.allocate(env)        # list[float], one per unit, weighted mean == target
    summary = agent.run(env)            # ratios + final ppl / fact metrics + total reward

Observation feature 8 (``last_drop``) is 0 in proxy episodes but measured in exact ones; a policy
trained on proxy never saw it vary, so when it plays an exact env the feature is zeroed: the policy
sees exactly the features it was trained on.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ENV_ID = "prune_env/LayerPrune-v0"
ALGO_NAMES = ("ppo", "sac", "dqn")
CONFIG_NAME = "config.yaml"
FINAL_MODEL = "final_model.zip"
VECNORMALIZE = "vecnormalize.pkl"
LAST_DROP = 8  # observation index of last_drop (see LayerPruneEnv's docstring)

__all__ = ["ALGO_NAMES", "RLPolicyAgent", "algo_class", "env_kwargs", "find_config", "load_policy", "make_env",
           "play_episode", "resolve_policy_path"]


def algo_class(name: str):
    """The SB3 class for an algo name (ppo | sac | dqn)."""
    from stable_baselines3 import DQN, PPO, SAC

    classes = {"ppo": PPO, "sac": SAC, "dqn": DQN}
    if name not in classes:
        raise ValueError(f"unknown algo {name!r}: use one of {', '.join(ALGO_NAMES)}")
    return classes[name]


def make_env(torch_threads: int | None = None, **kwargs):
    """LayerPrune-v0 through gym.make (module-level, so SubprocVecEnv can pickle it by reference).

    `torch_threads` sets torch's thread count in the process that builds the env (SubprocVecEnv workers).
    """
    import gymnasium as gym

    import prune_env  # noqa: F401  (registers the env ids)

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    env = gym.make(ENV_ID, **kwargs)
    if isinstance(env.action_space, gym.spaces.Box):
        # SB3's Gaussian policies start at mean 0 and work best on a symmetric [-1, 1] space: unscaled, the
        # deterministic policy sits on the Box(0, 1) bound (ratio = min_sparsity) and never leaves it
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    return env


def to_env_action(action, model_space, env_space):
    """Map a policy action from the space it was trained in to the env's (identity when they agree)."""
    import numpy as np
    from gymnasium import spaces

    if not isinstance(env_space, spaces.Box) or not isinstance(model_space, spaces.Box):
        return action
    if np.array_equal(model_space.low, env_space.low) and np.array_equal(model_space.high, env_space.high):
        return action
    unit = (np.asarray(action, dtype=np.float64) - model_space.low) / (model_space.high - model_space.low)
    return np.clip(env_space.low + unit * (env_space.high - env_space.low), env_space.low,
                   env_space.high).astype(env_space.dtype)


def env_kwargs(config: dict, fidelity: str | None = None, data_overrides: dict | None = None) -> dict:
    """LayerPrune-v0 kwargs from a resolved train config, with optional fidelity and data overrides."""
    kwargs = {key: (dict(value) if isinstance(value, dict) else value) for key, value in config["env"].items()}
    if fidelity is not None:
        kwargs["fidelity"] = fidelity
    if data_overrides:
        kwargs["data"] = {**kwargs.get("data", {}), **data_overrides}
    return kwargs


def eval_env_kwargs(config: dict) -> dict:
    """The kwargs of the evaluation env of a train config: eval.fidelity and eval.data over env."""
    evaluation = config.get("eval", {})
    return env_kwargs(config, evaluation.get("fidelity", "exact"), evaluation.get("data") or {})


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
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} beside {str(policy_path)!r} or in the two folders above it: "
                            "the policy must come from train.py's run folder")


def _normalizer_beside(policy_path: Path):
    """VecNormalize statistics saved next to the policy (None when obs normalisation was off)."""
    path = policy_path.parent / VECNORMALIZE
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        normalizer = pickle.load(handle)  # VecNormalize without its venv: normalize_obs still works
    normalizer.training = False
    return normalizer


def load_policy(path: str | Path, device: str = "cpu"):
    """(SB3 model, resolved config dict, VecNormalize or None) of a policy saved by train.py."""
    policy_path = resolve_policy_path(path)
    config = yaml.safe_load(find_config(policy_path).read_text())
    model = algo_class(config["algo"]["name"]).load(policy_path, device=device)
    return model, config, _normalizer_beside(policy_path)


def policy_observation(obs: np.ndarray, env, train_fidelity: str, normalizer=None) -> np.ndarray:
    """The observation as the policy saw it in training (last_drop zeroed when trained on proxy)."""
    obs = np.array(obs, dtype=np.float32, copy=True)
    if train_fidelity == "proxy" and env.unwrapped.fidelity != "proxy":
        obs[LAST_DROP] = 0.0
    if normalizer is not None:
        obs = normalizer.normalize_obs(obs).astype(np.float32)
    return obs


def check_compatible(model, env) -> None:
    """Fail with an explanation when the env's spaces are not the ones the policy was trained on."""
    from gymnasium import spaces

    obs_space, act_space = env.unwrapped.observation_space, env.unwrapped.action_space
    if obs_space.shape != model.observation_space.shape:
        raise ValueError(f"the policy was trained on observations of shape {model.observation_space.shape} but the "
                         f"env gives {obs_space.shape}: use the same granularity (and model family) as in training")
    if type(act_space) is not type(model.action_space) or (
            isinstance(act_space, spaces.Discrete) and act_space.n != model.action_space.n):
        raise ValueError(f"the policy acts in {model.action_space} but the env expects {act_space}: use the same "
                         "action_type (and n_actions) as in training")


def play_episode(model, env, *, train_fidelity: str = "proxy", normalizer=None, seed: int | None = None,
                 target: float | None = None) -> dict[str, Any]:
    """One deterministic episode of `model` on a LayerPrune env; the final info plus reward and timing."""
    check_compatible(model, env)
    started = time.time()
    options = {"target_sparsity": float(target)} if target is not None else None
    obs, _ = env.reset(seed=seed, options=options)
    total, steps, done, info = 0.0, 0, False, {}
    while not done:
        action, _ = model.predict(policy_observation(obs, env, train_fidelity, normalizer), deterministic=True)
        obs, reward, terminated, truncated, info = env.step(to_env_action(action, model.action_space,
                                                                          env.action_space))
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
    unwrapped = env.unwrapped
    reference = unwrapped.reference
    return {"reward": total, "quality": float(info["quality"]), "ppl": float(info["ppl"]),
            "fact_acc": float(info["fact_acc"]), "fact_nll": float(info["fact_nll"]),
            "fact_retention": float(info["fact_retention"]), "achieved_sparsity": float(info["achieved_sparsity"]),
            "dense_ppl": float(reference.ppl), "dense_fact_acc": float(reference.fact_acc),
            "target_sparsity": float(unwrapped.episode_target), "allocation": [float(r) for r in info["allocation"]],
            "steps": steps, "seconds": time.time() - started}


class RLPolicyAgent:
    """A policy saved by train.py, playing LayerPrune-v0 deterministically to produce an allocation."""

    def __init__(self, path: str | Path, device: str = "cpu", name: str | None = None):
        self.path = resolve_policy_path(path)
        self.model, self.config, self.normalizer = load_policy(self.path, device)
        self.algo = self.config["algo"]["name"]
        self.train_fidelity = self.config["env"].get("fidelity", "proxy")
        self.name = name or f"rl-{self.algo}"
        self.last_result: dict[str, Any] | None = None

    def trained_env_kwargs(self, fidelity: str | None = "exact") -> dict:
        """LayerPrune-v0 kwargs of the training config (model, granularity, action_type, data...), at `fidelity`."""
        return env_kwargs(self.config, fidelity)

    def run(self, env, seed: int | None = None, target: float | None = None) -> dict[str, Any]:
        """Play one deterministic episode; the summary (allocation, ppl, fact metrics, reward)."""
        result = play_episode(self.model, env, train_fidelity=self.train_fidelity, normalizer=self.normalizer,
                              seed=seed, target=target)
        unwrapped = env.unwrapped
        result.update(agent=self.name, algo=self.algo, policy=str(self.path), units=list(unwrapped.unit_names),
                      granularity=unwrapped.ctx.granularity, model=unwrapped.ctx.spec, fidelity=unwrapped.fidelity)
        self.last_result = result
        return result

    def allocate(self, env, seed: int | None = None, target: float | None = None) -> list[float]:
        """Per-unit sparsity ratios chosen by the policy on `env` (a LayerPrune-v0 env, any fidelity)."""
        return list(self.run(env, seed=seed, target=target)["allocation"])

    def __repr__(self) -> str:
        return f"RLPolicyAgent({str(self.path)!r}, algo={self.algo!r})"
