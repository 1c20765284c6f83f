"""The research API through gym.make on tiny models: registration, seeded target ranges, user reward terms,
observation features and pruning methods, the vector reward and its linear scalarisation."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import uuid

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import prune_env  # noqa: F401  (registers the environments)
from prune_env.pruning.masking import score_mask
from prune_env.pruning.methods import register_method
from prune_env.models import weight_matrix
from prune_env.envs.plugins import register_observation_feature, register_reward_term
from prune_env.envs.wrappers import LinearizeReward

ENV_ID = "prune_env/LayerPrune-v0"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def play(env, value: float = 0.5):
    obs, info = env.reset(seed=0)
    observations, rewards, done = [obs], [], False
    while not done:
        obs, reward, done, _, info = env.step(np.array([value], dtype=np.float32))
        observations.append(obs)
        rewards.append(reward)
    return observations, rewards, info


def test_gym_make_imports_the_package_by_itself(tiny_data):
    code = ("import json, sys, gymnasium as gym\n"
            "env = gym.make('prune_env:prune_env/LayerPrune-v0', model='tiny-llama', data=json.loads(sys.argv[1]))\n"
            "spec = gym.spec('prune_env/IterativePrune-v0')\n"
            "print(env.spec.reward_threshold, spec.max_episode_steps, env.unwrapped.context.spec)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(tiny_data)], capture_output=True, text=True,
                          env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-1.028", "100", "tiny-llama"]


def test_target_range_draws_reproducibly_from_reset_seed(tiny_data):
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, target_sparsity_range=(0.3, 0.6))
    targets = [env.reset(seed=seed)[1]["target_sparsity"] for seed in (1, 2, 1)]
    assert targets[0] == targets[2] != targets[1] and all(0.3 <= t <= 0.6 for t in targets)
    _, _, info = play(env.unwrapped)  # play() resets with seed 0
    total = env.unwrapped.context.total_numel
    assert abs(info["achieved_sparsity"] - info["target_sparsity"]) * total <= len(env.unwrapped.units)
    fixed = env.reset(seed=3, options={"target_sparsity": 0.4})[1]["target_sparsity"]
    drawn = env.reset(seed=3, options={"target_sparsity_range": (0.1, 0.2)})[1]["target_sparsity"]
    assert fixed == 0.4 and 0.1 <= drawn <= 0.2


def test_user_reward_term_adds_its_weighted_value(tiny_data):
    name = unique("latency")
    register_reward_term(name, lambda metrics, dense, context: 1.0 - metrics["achieved_sparsity"])
    plain = gym.make(ENV_ID, model="tiny-llama", data=tiny_data)
    with_term = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, reward={"terms": {name: 2.0}})
    _, plain_rewards, plain_info = play(plain)
    _, rewards, info = play(with_term)
    assert rewards[-1] == pytest.approx(plain_rewards[-1] + 2.0 * (1.0 - info["achieved_sparsity"]), abs=1e-12)
    with pytest.raises(ValueError, match="unknown reward term 'nope'"):
        gym.make(ENV_ID, model="tiny-llama", data=tiny_data, reward={"terms": {"nope": 1.0}})


def test_user_observation_feature_extends_the_box(tiny_data):
    name = unique("first-unit")
    register_observation_feature(name, lambda env, unit: float(unit == 0))
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, extra_features=[name])
    assert env.observation_space.shape == (10,)
    observations, _, _ = play(env)
    assert [float(obs[-1]) for obs in observations] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown observation feature 'nope'"):
        gym.make(ENV_ID, model="tiny-llama", data=tiny_data, extra_features=["nope"])
    iterative = gym.make("prune_env/IterativePrune-v0", model="tiny-llama", data=tiny_data, extra_features=[name])
    assert iterative.observation_space.shape == (6 * 3 + 6,)
    obs, _ = iterative.reset(seed=0)
    assert [float(obs[6 * i + 5]) for i in range(3)] == [1.0, 0.0, 0.0]


def test_observe_profile_false_blanks_only_the_profile_entries(tiny_data):
    seeing = gym.make(ENV_ID, model="tiny-llama", data=tiny_data)
    blind = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, observe_profile=False)
    check_env(blind.unwrapped, skip_render_check=True)
    seen, seen_rewards, _ = play(seeing)
    unseen, blind_rewards, _ = play(blind)
    assert any(np.any(obs[:2] != 0) for obs in seen)  # the tiny model's profile is not flat
    assert all(np.all(obs[:2] == 0) for obs in unseen)
    assert [obs[2:].tolist() for obs in unseen] == [obs[2:].tolist() for obs in seen]
    assert blind_rewards == seen_rewards  # what the agent sees changes, never what the env does
    with pytest.raises(ValueError, match="observe_profile='no' is not a boolean"):
        gym.make(ENV_ID, model="tiny-llama", data=tiny_data, observe_profile="no")


def test_user_pruning_method_runs_through_gym_make(tiny_data):
    name = unique("largest-first")
    register_method(name, lambda weight, stats, ratio, pattern: (score_mask(-weight.abs().float(), ratio), None),
                    statistics="none")
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, method=name)
    _, _, info = play(env)
    assert abs(info["achieved_sparsity"] - 0.5) < 1e-3
    ctx = env.unwrapped.context
    for ref in ctx.refs:
        live, dense = weight_matrix(ref.module), ctx.masked.dense[ref.name]
        removed, kept = dense.abs()[live == 0], dense.abs()[live != 0]
        assert removed.numel() and removed.min() >= kept.min()  # the largest weights went first
    proxy = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, method=name, fidelity="proxy",
                     proxy_eval_tokens=128, proxy_facts=6)
    assert abs(play(proxy)[2]["achieved_sparsity"] - 0.5) < 1e-3


def test_vector_reward_and_its_linear_scalarisation(tiny_data):
    scalar = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, reward={"ppl_weight": 1.0, "fact_weight": 0.5})
    vector = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, reward_mode="vector",
                      reward={"ppl_weight": 1.0, "fact_weight": 0.5})
    assert vector.unwrapped.reward_space.shape == (2,)
    _, scalar_rewards, info = play(scalar)
    _, vectors, _ = play(vector)
    assert all(v.shape == (2,) for v in vectors) and not vectors[0].any()
    dense = vector.unwrapped.reference
    assert vectors[-1][0] == pytest.approx(-np.log(info["ppl"] / dense.ppl))
    assert vectors[-1][1] == pytest.approx(info["fact_acc"] - dense.fact_acc)
    _, linear, _ = play(LinearizeReward(vector, [1.0, 0.5]))
    assert linear[-1] == pytest.approx(scalar_rewards[-1], abs=1e-12)
    with pytest.raises(ValueError, match="one per objective"):
        LinearizeReward(vector, [1.0])
    with pytest.raises(ValueError, match="reward_mode='vector'"):
        LinearizeReward(scalar, [1.0, 0.5])


def test_reference_and_profile_are_public(tiny_data):
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data).unwrapped
    profile = env.profile
    assert profile.units == env.unit_names and len(profile.z_wanda) == len(profile.z_grad) == len(env.units)
    assert profile.numel == [u.numel for u in env.units] and env.reference.ppl == env.context.dense.ppl
    obs, _ = env.reset(seed=0)
    assert obs[0] == pytest.approx(profile.z_wanda[0]) and obs[1] == pytest.approx(profile.z_grad[0])
    assert torch.is_tensor(env.context.masked.dense[env.context.refs[0].name])


def test_reward_space_is_reachable_through_the_wrappers(tiny_data):
    from prune_env.envs.factory import make_env

    expected = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    made = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, reward_mode="vector")
    rescaled = make_env(ENV_ID, model="tiny-llama", data=tiny_data, reward_mode="vector")
    assert type(rescaled) is not type(made)  # make_env's RescaleAction on top of gym.make's wrappers
    for env in (made, rescaled):
        assert env.get_wrapper_attr("reward_space") == expected
    linear = LinearizeReward(rescaled, [1.0, 0.5])
    assert linear.get_wrapper_attr("reward_space") == expected
    _, rewards, info = play(linear, 0.0)
    assert rewards[-1] == pytest.approx(float(np.dot([1.0, 0.5], info["vector_reward"])), abs=1e-12)


@pytest.fixture
def tiny_reference(tmp_path, monkeypatch):
    """A reference table with one tiny task (written by the test) in place of the packaged one."""
    from prune_env.envs import reference

    table = tmp_path / "reference_scores.json"
    monkeypatch.setattr(reference, "TABLE", table)
    reference.load_table.cache_clear()
    yield table
    reference.load_table.cache_clear()


def test_normalised_score_places_the_return_between_uniform_and_best_known(tiny_data, tiny_reference, monkeypatch):
    from agents.base import play_allocation
    from prune_env.envs import reference

    plain = gym.make(ENV_ID, model="tiny-llama", data=tiny_data)
    candidates = [[0.5, 0.5, 0.5], [0.3, 0.6, 0.6], [0.6, 0.6, 0.3], [0.6, 0.3, 0.6], [0.2, 0.5, 0.8], [0.8, 0.5, 0.2]]
    infos = {tuple(a): play_allocation(plain, a) for a in candidates}
    assert all(info["normalised_score"] is None for info in infos.values())  # tiny data: no task in the table
    uniform = infos[(0.5, 0.5, 0.5)]["quality"]
    best = max(infos, key=lambda a: infos[a]["quality"])
    assert infos[best]["quality"] > uniform  # some allocation beats uniform on the tiny model
    row = {"uniform": uniform, "best_rule": {"name": "rule", "return": infos[best]["quality"]},
           "best_known": {"name": "rule", "return": infos[best]["quality"]}, "returns": {}}
    tiny_reference.write_text(json.dumps({"tasks": {"tiny/exact": {"0.5": row}}}))
    monkeypatch.setattr(reference, "task_for", lambda context, fidelity, reward: f"tiny/{fidelity}")
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data)
    assert play_allocation(env, [0.5, 0.5, 0.5])["normalised_score"] == pytest.approx(0.0, abs=1e-12)
    assert play_allocation(env, list(best))["normalised_score"] == pytest.approx(1.0, abs=1e-12)
    assert play_allocation(env, list(best), target=0.4)["normalised_score"] is None  # 0.4 is not in the table
    proxy = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, fidelity="proxy", proxy_eval_tokens=128,
                     proxy_facts=6)
    assert play_allocation(proxy, [0.5, 0.5, 0.5])["normalised_score"] is None  # no tiny/proxy row


def test_iterative_episode_end_has_no_normalised_score(tiny_data):
    env = gym.make("prune_env/IterativePrune-v2", model="tiny-llama", data=tiny_data, target_sparsity=0.1,
                   rollback_threshold=float("inf"))
    env.reset(seed=0)
    done, infos = False, []
    while not done:
        _, _, terminated, truncated, info = env.step(np.ones(env.action_space.n, dtype=np.int8))
        done = terminated or truncated
        infos.append(info)
    assert "normalised_score" in infos[-1] and infos[-1]["normalised_score"] is None
    assert all("normalised_score" not in info for info in infos[:-1])


def test_layer_env_docstring_shows_the_reference_table():
    from prune_env.envs import reference
    from prune_env.envs.layer import LayerPruneEnv

    assert reference.markdown() in inspect.getdoc(LayerPruneEnv), \
        "LayerPruneEnv's docstring table differs from prune_env/envs/reference_scores.json: paste reference.markdown()"
