"""Wrappers for the multi-objective mode: `reward_mode="vector"` returns one reward per objective.

`LinearizeReward(env, weights)` turns the vector into weights . reward, MO-Gymnasium's `LinearReward`
convention (the unscalarised vector stays in `info["vector_reward"]`), so single-objective learners
such as SB3 can train on any trade-off without rebuilding the environment.

The vector's space is `reward_space`; through any stack of wrappers (gym.make's, `make_env`'s
RescaleAction, this one) read it with `env.get_wrapper_attr("reward_space")`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class LinearizeReward(gym.Wrapper):
    """Scalar reward weights . vector_reward; `weights` has one entry per objective of `env.reward_space`."""

    def __init__(self, env: gym.Env, weights) -> None:
        super().__init__(env)
        if env.unwrapped.reward_mode != "vector":
            raise ValueError("LinearizeReward needs an env built with reward_mode='vector'")
        space = env.get_wrapper_attr("reward_space")
        values = np.asarray(weights)
        if values.dtype.kind not in "iuf" or values.shape != space.shape or not np.isfinite(values).all():
            raise ValueError(f"weights {weights!r} must be {space.shape[0]} finite numbers, one per objective "
                             f"{env.unwrapped.reward_config.names()}")
        self.weights = values.astype(np.float64)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "vector_reward": reward}
        return obs, float(np.dot(self.weights, reward)), terminated, truncated, info
