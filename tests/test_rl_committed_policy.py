"""The committed SmolLM2 PPO policy loads through the pickle-free loader with the same parameters.

The policy acts on 9 observation features whatever the model (block granularity), so the tiny model's
env has its spaces: no SmolLM2 is loaded here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents.rl import load_policy, rollout_policy, read_run_config
from prune_env.envs.factory import make_env

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "ppo-smollm2-50" / "final_model.zip"


@pytest.fixture()
def tiny_env(tiny_data: dict):
    trained = read_run_config(COMMITTED).env
    env = make_env(model="tiny-llama", granularity=trained.granularity, action_type=trained.action_type,
                   min_sparsity=trained.min_sparsity, max_sparsity=trained.max_sparsity, fidelity="proxy",
                   proxy_eval_tokens=64, proxy_facts=4, data=tiny_data)
    yield env
    env.close()


def test_committed_policy_acts_as_with_sb3s_own_loader(tiny_env):
    from stable_baselines3 import PPO

    saved = load_policy(COMMITTED, tiny_env)
    reference = PPO.load(COMMITTED, device="cpu")  # SB3's loader (unpickles): our own committed file
    assert saved.model.num_timesteps == reference.num_timesteps == 7200
    for name, tensor in reference.policy.state_dict().items():
        assert tensor.equal(saved.model.policy.state_dict()[name]), name
    obs = np.random.default_rng(0).uniform(-3, 3, (256, 9)).astype(np.float32)
    assert np.array_equal(saved.model.predict(obs, deterministic=True)[0],
                          reference.predict(obs, deterministic=True)[0])
    first = rollout_policy(saved.model, tiny_env, seed=0)
    assert rollout_policy(reference, tiny_env, seed=0)["allocation"] == first["allocation"]
