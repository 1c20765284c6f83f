"""The one env factory for code that trains or plays policies: `make_env`.

It is a module-level function, so SubprocVecEnv workers can pickle it by reference, and it wraps
continuous envs the way every SB3 policy of this project was trained (actions in [-1, 1]).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


ENV_ID = "prune_env/LayerPrune-v0"


def make_env(env_id: str = ENV_ID, torch_threads: int | None = None, rescale: bool = True, **env_kwargs) -> gym.Env:
    """`gym.make(env_id, **env_kwargs)`, continuous actions rescaled to [-1, 1] unless `rescale=False`.

    SB3's Gaussian policies start at mean 0 and work best on a symmetric [-1, 1] space: unscaled, the
    deterministic policy sits on the Box(0, 1) bound (ratio = min_sparsity) and never leaves it.

    Args:
        env_id: a registered id, e.g. "prune_env/LayerPrune-v1" (default: LayerPrune-v0).
        torch_threads: torch's thread count in the process that builds the env (SubprocVecEnv workers);
            None leaves it as it is.
        rescale: wrap a Box action space in `RescaleAction` to [-1, 1] (a discrete space is never wrapped).
        **env_kwargs: the env's keywords (`LayerPruneEnv.__init__`'s Args), passed to `gym.make`.

    Returns:
        The wrapped env; `env.unwrapped` is the LayerPruneEnv (or IterativePruneEnv).
    """
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    env = gym.make(env_id, **env_kwargs)
    if rescale and isinstance(env.action_space, gym.spaces.Box):
        # bounds in the space's own dtype: Python floats make Gymnasium warn that it lowers their precision
        space = env.action_space
        env = gym.wrappers.RescaleAction(env, np.full(space.shape, -1.0, space.dtype), np.full(space.shape, 1.0, space.dtype))
    return env
