"""The v1 ids have model-independent spaces: one SB3 policy trained on tiny-llama plays tiny models of another
family and another unit count without a shape error (the v0 spaces differ between them)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO

import prune_env  # noqa: F401  (registers the environments)
from prune_env.envs.observation import ROLES, linear_role


def run_policy(model: PPO, env: gym.Env) -> dict:
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return info


def test_linear_roles_are_family_independent():
    assert [linear_role(k) for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")] == \
        ["attention_in", "attention_out", "mlp_in", "mlp_out"]
    assert [linear_role(k) for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] == \
        ["attention_in", "attention_out", "mlp_in", "mlp_out"]
    assert [linear_role(k) for k in ("self_attn.out_proj", "fc1", "fc2")] == ["attention_out", "mlp_in", "mlp_out"]


def test_layer_prune_v1_policy_transfers_across_families(tiny_data):
    make = lambda spec, version: gym.make(f"prune_env/LayerPrune-{version}", model=spec, data=tiny_data,  # noqa: E731
                                          granularity="linear")
    assert make("tiny-llama", "v0").observation_space.shape != make("tiny-gpt2", "v0").observation_space.shape
    train = make("tiny-llama", "v1")
    assert train.observation_space.shape == (9 + len(ROLES),)
    model = PPO("MlpPolicy", train, n_steps=21, batch_size=21, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=21)
    for spec in ("tiny-gpt2", "tiny-opt"):
        env = make(spec, "v1")
        assert env.observation_space == train.observation_space and env.action_space == train.action_space
        assert len(env.unwrapped.units) != len(train.unwrapped.units)
        info = run_policy(model, env)
        assert abs(info["achieved_sparsity"] - 0.5) * env.unwrapped.context.total_numel <= len(env.unwrapped.units)


def test_iterative_prune_v1_policy_transfers_across_families_and_unit_counts(tiny_data):
    make = lambda spec, version, granularity: gym.make(  # noqa: E731
        f"prune_env/IterativePrune-{version}", model=spec, data=tiny_data, granularity=granularity, max_steps=4,
        rollback_threshold=float("inf"))
    assert make("tiny-llama", "v0", "linear").action_space != make("tiny-gpt2", "v0", "linear").action_space
    train = make("tiny-llama", "v1", "linear")
    assert train.observation_space.shape == (5 * 8 + 6,) and train.action_space == gym.spaces.MultiBinary(8)
    model = PPO("MlpPolicy", train, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=8)
    for spec, granularity in (("tiny-gpt2", "linear"), ("tiny-llama", "block")):
        env = make(spec, "v1", granularity)
        assert env.observation_space == train.observation_space and env.action_space == train.action_space
        info = run_policy(model, env)
        assert info["step"] >= 1 and len(info["allocation"]) == len(env.unwrapped.units)


def test_iterative_v1_bin_selects_its_units(tiny_data):
    env = gym.make("prune_env/IterativePrune-v1", model="tiny-llama", data=tiny_data, granularity="linear",
                   rollback_threshold=float("inf")).unwrapped
    env.reset(seed=0)
    action = np.zeros(8, dtype=np.int8)
    action[2] = 1
    info = env.step(action)[4]
    assert info["changed"] == env.bin_units[2] == [6, 7]
    with pytest.raises(ValueError, match=r"MultiBinary\(8\)"):
        env.step(np.zeros(21, dtype=np.int8))
