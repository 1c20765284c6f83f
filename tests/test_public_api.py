"""The public names import from `prune_env` itself, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import prune_env
from prune_env.context import DataConfig, PruningContext
from prune_env.envs.factory import make_env
from prune_env.envs.iterative import IterativePruneEnv
from prune_env.envs.layer import LayerPruneEnv
from prune_env.envs.plugins import register_observation_feature, register_reward_term
from prune_env.pruning.methods import register_method
from prune_env.pruning.sequential import prune_model


def test_each_public_name_is_the_object_its_module_defines():
    expected = {"make_env": make_env, "LayerPruneEnv": LayerPruneEnv, "IterativePruneEnv": IterativePruneEnv,
                "PruningContext": PruningContext, "DataConfig": DataConfig, "prune_model": prune_model,
                "register_reward_term": register_reward_term,
                "register_observation_feature": register_observation_feature, "register_method": register_method}
    assert sorted(prune_env.__all__) == sorted([*expected, "__version__"])
    for name, value in expected.items():
        assert getattr(prune_env, name) is value, name
    assert set(prune_env.__all__) <= set(dir(prune_env))
    with pytest.raises(AttributeError, match="no attribute 'LayerPrune'"):
        prune_env.LayerPrune  # noqa: B018


def test_importing_the_package_registers_the_envs_without_loading_torch():
    code = ("import sys, gymnasium as gym, prune_env; "
            "print('torch' in sys.modules, 'prune_env/LayerPrune-v1' in gym.registry)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]
