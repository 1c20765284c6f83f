"""Policies move between models: an SB3 PPO policy trained on tiny-llama (3 blocks) and saved with `model.save`
loads and plays full episodes on tiny models of another depth (tiny-llama-5, tiny-qwen2-4) and another family
(tiny-gpt2) in the model-independent ids LayerPrune-v1 (block and linear granularity) and IterativePrune-v1.

Each saved policy is loaded twice: by SB3's `PPO.load(path, env=...)`, which refuses a zip whose saved spaces
differ from the env's, and by the project's pickle-free `training.safe_load.load_parameters` into a network built
in the new env's spaces (it refuses tensors of another shape); both must act identically. The v0 control shows
the check is not vacuous: an IterativePrune-v0 policy of tiny-llama does not load on tiny-llama-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from training.safe_load import load_parameters
from prune_env.envs.factory import make_env
from prune_env.models import decoder_blocks
from prune_env.envs.plugins import register_reward_term
from prune_env.tiny import DEFAULT_BLOCKS, parse_tiny_name, tiny_model

TARGET = 0.5
TRAIN_STEPS = 256
# IterativePrune pays nothing for reaching the target, so nothing asks a briefly trained policy to get there; this
# term pays for sparsity, so the episodes on the other models can be asserted to end at the target.
SPARSITY_TERM = "transfer_test_sparsity"
register_reward_term(SPARSITY_TERM, lambda metrics, dense, context: metrics["achieved_sparsity"])
ITERATIVE = {"granularity": "block", "increment": 0.25, "max_steps": 8, "rollback_threshold": math.inf,
             "reward": {"terms": {SPARSITY_TERM: 10.0}}}
CASES = {
    "layer-v1-block": ("prune_env/LayerPrune-v1", {"granularity": "block"}),
    "layer-v1-linear": ("prune_env/LayerPrune-v1", {"granularity": "linear"}),
    "iterative-v1": ("prune_env/IterativePrune-v1", ITERATIVE),
}
# another depth, another depth and family, another family (3 blocks, other linears)
OTHER_MODELS = ("tiny-llama-5", "tiny-qwen2-4", "tiny-gpt2")


def build_env(case: str, model: str, data: dict):
    env_id, kwargs = CASES[case]
    return make_env(env_id, model=model, data=data, target_sparsity=TARGET, **kwargs)


@pytest.fixture(scope="module")
def saved_policies(tiny_data, tmp_path_factory) -> dict:
    """Each case's PPO policy, trained TRAIN_STEPS steps on tiny-llama and saved with SB3's model.save."""
    folder = tmp_path_factory.mktemp("transfer")
    paths = {}
    for case in CASES:
        env = build_env(case, "tiny-llama", tiny_data)
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=0, device="cpu")
        model.learn(total_timesteps=TRAIN_STEPS)
        paths[case] = folder / f"{case}.zip"
        model.save(paths[case])
        env.close()
    return paths


def test_tiny_names_choose_the_depth():
    assert parse_tiny_name("llama") == ("llama", DEFAULT_BLOCKS) == ("llama", 3)
    assert parse_tiny_name("llama-5") == ("llama", 5) and parse_tiny_name("qwen2-4") == ("qwen2", 4)
    assert parse_tiny_name("gemma3") == ("gemma3", 3)  # a digit in the family is not a depth
    for name, blocks in (("llama-5", 5), ("gpt2-2", 2), ("opt-4", 4)):
        assert len(decoder_blocks(tiny_model(name)[0])) == blocks
    plain, three = tiny_model("llama")[0], tiny_model("llama-3")[0]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), three.state_dict().values()))
    with pytest.raises(ValueError, match=r"'llama-0' asks for 0 decoder blocks: use 1 to 64"):
        parse_tiny_name("llama-0")
    with pytest.raises(ValueError, match=r"unknown tiny family in 'bert-4'"):
        parse_tiny_name("bert-4")


def play(policy: PPO, env, twin: PPO) -> tuple[dict, int]:
    """One deterministic episode of `policy`; `twin` (the same tensors, loaded pickle-free) must act the same."""
    obs, _ = env.reset(seed=0)
    steps, done, info = 0, False, {}
    while not done:
        action, _ = policy.predict(obs, deterministic=True)
        np.testing.assert_array_equal(action, twin.predict(obs, deterministic=True)[0])
        obs, _, terminated, truncated, info = env.step(action)
        assert not truncated, f"truncated after {steps + 1} steps at sparsity {info['achieved_sparsity']}"
        steps, done = steps + 1, terminated
    return info, steps


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("other", OTHER_MODELS)
def test_saved_policy_plays_a_model_of_another_depth_or_family(case, other, saved_policies, tiny_data):
    env = build_env(case, other, tiny_data)
    units = env.unwrapped.units
    family, blocks = parse_tiny_name(other.removeprefix("tiny-"))
    assert (family, blocks) != ("llama", 3) and len(decoder_blocks(env.unwrapped.context.model)) == blocks
    policy = PPO.load(saved_policies[case], env=env, device="cpu")  # SB3 refuses other saved spaces
    assert policy.observation_space == env.observation_space and policy.action_space == env.action_space
    twin = PPO("MlpPolicy", env, n_steps=64, batch_size=64, device="cpu")
    load_parameters(twin, saved_policies[case])  # tensors only, exact shapes
    info, steps = play(policy, env, twin)
    total = env.unwrapped.context.total_numel
    if case.startswith("layer"):
        assert steps == len(units)  # one step per unit of the NEW model
        assert abs(info["achieved_sparsity"] - TARGET) * total <= len(units)
    else:
        assert 1 <= steps <= ITERATIVE["max_steps"]
        assert abs(info["achieved_sparsity"] - TARGET) * total <= 1
    assert len(info["allocation"]) == len(units)
    env.close()


def test_v0_policy_of_another_depth_is_refused(tiny_data, tmp_path):
    """The control: v0's IterativePrune spaces grow with the depth, so the same load fails on tiny-llama-5."""
    kwargs = {k: v for k, v in ITERATIVE.items() if k != "reward"}
    source = make_env("prune_env/IterativePrune-v0", model="tiny-llama", data=tiny_data, **kwargs)
    PPO("MlpPolicy", source, n_steps=8, batch_size=8, device="cpu").save(tmp_path / "v0.zip")
    deeper = make_env("prune_env/IterativePrune-v0", model="tiny-llama-5", data=tiny_data, **kwargs)
    assert deeper.observation_space.shape == (5 * 5 + 6,) != source.observation_space.shape
    with pytest.raises(ValueError, match="Observation spaces do not match"):
        PPO.load(tmp_path / "v0.zip", env=deeper, device="cpu")
