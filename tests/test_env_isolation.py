"""Envs of one process never touch each other's weights: each env owns its model unless the caller lends one.

Real Gymnasium / SB3 vector envs and an SB3 EvalCallback on tiny-llama (3 blocks, block granularity).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

import prune_env  # noqa: F401  (registers the environments)
from prune_env.context import PruningContext
from prune_env.envs.layer import LayerPruneEnv

ENV_ID = "prune_env/LayerPrune-v0"
ACTIONS = ([0.1, 0.1, 0.9], [0.9, 0.9, 0.1])
KEYS = ("ppl", "fact_acc", "fact_nll", "fact_retention", "achieved_sparsity")


def env_kwargs(tiny_data) -> dict:
    return {"model": "tiny-llama", "data": tiny_data, "target_sparsity": 0.5}


def alone(tiny_data, actions) -> tuple[float, dict]:
    """The terminal reward and info of one episode on a fresh env of its own."""
    env = gym.make(ENV_ID, **env_kwargs(tiny_data))
    env.reset(seed=0)
    for value in actions:
        _, reward, terminated, _, info = env.step(np.array([value], dtype=np.float32))
    assert terminated
    env.close()
    return reward, info


def assert_same(info: dict, expected: dict) -> None:
    for key in KEYS:
        assert info[key] == expected[key], key
    assert list(info["allocation"]) == list(expected["allocation"])


def test_two_envs_in_an_sb3_dummy_vec_env_match_each_env_alone(tiny_data):
    expected = [alone(tiny_data, actions) for actions in ACTIONS]
    assert all(abs(info["achieved_sparsity"] - 0.5) < 1e-3 for _, info in expected)
    venv = make_vec_env(ENV_ID, n_envs=2, vec_env_cls=DummyVecEnv, env_kwargs=env_kwargs(tiny_data))
    venv.reset()
    for step in range(3):
        _, rewards, dones, infos = venv.step(np.array([[ACTIONS[0][step]], [ACTIONS[1][step]]], dtype=np.float32))
    assert dones.all()
    for i in range(2):
        assert rewards[i] == pytest.approx(expected[i][0], abs=0)
        assert_same(infos[i], expected[i][1])
    venv.close()


def test_two_envs_in_a_gymnasium_sync_vector_env_match_each_env_alone(tiny_data):
    expected = [alone(tiny_data, actions) for actions in ACTIONS]
    venv = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="sync", **env_kwargs(tiny_data))
    venv.reset(seed=0)
    for step in range(3):
        _, rewards, terminated, _, infos = venv.step(np.array([[ACTIONS[0][step]], [ACTIONS[1][step]]],
                                                              dtype=np.float32))
    assert terminated.all()
    for i in range(2):
        assert rewards[i] == expected[i][0]
        assert_same({key: infos[key][i] for key in (*KEYS, "allocation")}, expected[i][1])
    venv.close()


class _FinalSparsity(gym.Wrapper):
    """Records the achieved sparsity at the end of every episode."""

    def __init__(self, env: gym.Env, sink: list[float]):
        super().__init__(env)
        self.sink = sink

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            self.sink.append(info["achieved_sparsity"])
        return obs, reward, terminated, truncated, info


def test_training_episodes_under_an_eval_callback_end_on_the_target(tiny_data, tmp_path):
    train_ends: list[float] = []
    eval_ends: list[float] = []
    train_env = _FinalSparsity(gym.make(ENV_ID, **env_kwargs(tiny_data)), train_ends)
    eval_env = _FinalSparsity(gym.make(ENV_ID, **env_kwargs(tiny_data)), eval_ends)
    callback = EvalCallback(eval_env, eval_freq=20, n_eval_episodes=1, deterministic=True, verbose=0,
                            log_path=None, best_model_save_path=None)
    model = PPO("MlpPolicy", train_env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu", verbose=0)
    model.learn(total_timesteps=200, callback=callback)
    assert len(train_ends) >= 60 and len(eval_ends) >= 9
    total = train_env.unwrapped.context.total_numel
    for achieved in train_ends + eval_ends:
        assert abs(achieved - 0.5) * total <= len(train_env.unwrapped.units)  # within one weight per unit


def test_each_env_owns_its_model_and_a_lent_context_is_shared(tiny_data):
    """Without `context=` two envs hold two models; with it the env plays on the caller's model itself."""
    first = LayerPruneEnv(**env_kwargs(tiny_data))
    second = LayerPruneEnv(**env_kwargs(tiny_data))
    assert first.context is not second.context and first.context.model is not second.context.model
    lent = PruningContext("tiny-llama", data=tiny_data)
    borrower = LayerPruneEnv(context=lent, target_sparsity=0.5)
    assert borrower.context is lent and borrower.context.model is lent.model
    borrower.reset(seed=0)
    for _ in range(3):
        borrower.step(np.array([0.5], dtype=np.float32))
    # the lender sees the episode's masks on its own model: that is what lending means
    assert abs(lent.achieved_sparsity() - 0.5) < 1e-3
    assert first.context.achieved_sparsity() == 0.0
    borrower.reset(seed=0)
    assert lent.achieved_sparsity() == 0.0


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-gemma3"])
def test_private_models_are_bit_identical_and_keep_their_ties(spec):
    """The template keeps its bytes in a file: every further private model is the loaded one, bit for bit,
    with its own storage and the same tied parameters (GPT-2 and Gemma tie the embedding and the LM head)."""
    import torch

    from prune_env.context import private_model
    from prune_env.models import load_model

    fresh, _ = load_model(spec)
    models = [private_model(spec, "cpu", "float32")[0] for _ in range(3)]
    for model in models:
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in fresh.named_parameters()]
        for (name, value), (_, expected) in zip([*model.named_parameters(), *model.named_buffers()],
                                                [*fresh.named_parameters(), *fresh.named_buffers()]):
            assert value.dtype == expected.dtype and torch.equal(value, expected), name
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    first, second = models[1:]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), second.parameters()))


def test_close_releases_an_owned_model_and_leaves_a_lent_one_dense(tiny_data):
    import os
    import pickle

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    LayerPruneEnv(**env_kwargs(tiny_data)).close()  # the process's template exists from here on
    before = open_files()
    owned = LayerPruneEnv(**env_kwargs(tiny_data))
    assert open_files() == before + 1  # its dense snapshot
    names = list(owned.unit_names)
    with pytest.raises(TypeError, match="does not pickle: send its constructor arguments"):
        pickle.dumps(owned)
    owned.reset(seed=0)
    alone_reward = [owned.step(np.array([v], np.float32))[1] for v in ACTIONS[0]][-1]
    owned.close()
    owned.close()  # twice is fine
    assert open_files() == before
    assert all(p.device.type == "meta" for p in owned.context.model.parameters())  # the weights are gone
    assert [u.name for u in owned.context.units] == names and owned.context.spec == "tiny-llama"
    lent = PruningContext("tiny-llama", data=tiny_data)
    borrower = LayerPruneEnv(context=lent, target_sparsity=0.5)
    borrower.reset(seed=0)
    rewards = [borrower.step(np.array([v], np.float32))[1] for v in ACTIONS[0]]
    borrower.close()
    assert lent.achieved_sparsity() == 0.0 and all(p.device.type == "cpu" for p in lent.model.parameters())
    assert rewards[-1] == alone_reward
