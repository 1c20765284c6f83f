"""fidelity="surrogate": the episode touches no weight and runs no forward; its terminal metrics are the
surrogate's prediction for the allocation the env applied."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prune_env.envs.layer import LayerPruneEnv
from prune_env.surrogate import append_record, load_surrogate, start_dataset
from tests.tiny_surrogate import write_tiny_dataset


def test_surrogate_episode_is_forward_free_and_predicts(tiny_data, tmp_path):
    path = tmp_path / "tiny.jsonl"
    exact = write_tiny_dataset(path, tiny_data)
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(path))
    model = env.context.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    block_handles = [ref.module.register_forward_pre_hook(lambda *args: calls.append(1)) for ref in env.context.refs]
    env.reset(seed=0)
    for value in (0.2, 0.5, 0.8):
        obs, reward, terminated, _, info = env.step(np.array([value], dtype=np.float32))
    handle.remove()
    for h in block_handles:
        h.remove()
    assert terminated and calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(info["achieved_sparsity"] - 0.5) < 1e-3
    predicted = load_surrogate(str(path), env.context).predict(info["allocation"])
    assert info["ppl"] == predicted["ppl"] and info["fact_acc"] == predicted["fact_acc"]
    dense = env.reference
    assert reward == pytest.approx(-np.log(info["ppl"] / dense.ppl) - (dense.fact_acc - info["fact_acc"]))


def test_balanced_knowledge_is_reported_where_the_data_set_has_it(tiny_data, tmp_path):
    """Records with balanced knowledge: the surrogate env's info carries the fit's prediction of it. Records
    without: the fields are absent, and a reward term that reads one fails naming the data set (never 0)."""
    import uuid

    from prune_env.envs.plugins import register_reward_term
    from prune_env.surrogate import MissingKnowledgeError

    name = f"kept-{uuid.uuid4().hex[:8]}"
    register_reward_term(name, lambda metrics, allocation, env: metrics["fact_retention_balanced"])
    knowing, plain = tmp_path / "knowing.jsonl", tmp_path / "plain.jsonl"
    write_tiny_dataset(knowing, tiny_data, knowledge=True)
    write_tiny_dataset(plain, tiny_data)
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(knowing),
                        reward={"terms": {name: 1.0}})
    env.reset(seed=0)
    for value in (0.2, 0.5, 0.8):
        *_, info = env.step(np.array([value], dtype=np.float32))
    predicted = load_surrogate(str(knowing), env.context).predict(info["allocation"])
    assert info["fact_retention_balanced"] == predicted["fact_retention_balanced"]
    assert info["fact_acc_balanced"] == predicted["fact_acc_balanced"]
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(plain))
    env.reset(seed=0)
    for value in (0.2, 0.5, 0.8):
        *_, info = env.step(np.array([value], dtype=np.float32))
    assert "fact_retention_balanced" not in info and "fact_acc_balanced" not in info
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(plain),
                        reward={"terms": {name: 1.0}})
    env.reset(seed=0)
    env.step(np.array([0.2], dtype=np.float32))
    env.step(np.array([0.5], dtype=np.float32))
    with pytest.raises(MissingKnowledgeError, match=f"fact_retention_balanced is not predicted: the surrogate data "
                                                    f"set '{plain}' has no record with it"):
        env.step(np.array([0.8], dtype=np.float32))


def test_packaged_surrogate_refuses_another_model(tiny_data):
    with pytest.raises(ValueError, match="was built for"):
        LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate")


# ----------------------------------------------------------------------------- the model-free surrogate env

def full_dataset(path, tiny_data, episodes: int = 8):
    """A data set whose header describes the units as `python -m prune_env.surrogate build` writes it (plus the per-linear
    counts), with records from exact episodes; returns the exact env that measured them."""
    from dataclasses import asdict

    exact = LayerPruneEnv(model="tiny-llama", data=tiny_data)
    ctx = exact.context
    start_dataset(path, {"context": ctx.describe(), "dense": ctx.dense.as_dict(), "data_config": asdict(ctx.data),
                         "unit_numel": [u.numel for u in exact.units],
                         "linear_numel": [[ref.numel for ref in u.linears] for u in exact.units],
                         "profile": {"z_wanda": list(ctx.z_wanda), "z_grad": list(ctx.z_grad)}})
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        exact.reset(seed=0)
        for value in rng.random(len(exact.units)):
            *_, info = exact.step(np.array([value], dtype=np.float32))
        append_record(path, {key: info[key] for key in ("allocation", "ppl", "fact_acc", "fact_nll",
                                                        "fact_retention")})
    return exact


@pytest.fixture(scope="module")
def light_data_set(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("light") / "tiny-full.jsonl"
    exact = full_dataset(path, tiny_data)
    return path, exact


def test_a_described_data_set_builds_the_env_without_a_model(light_data_set, tiny_data):
    from prune_env.envs.fidelities import SurrogateContext

    path, exact = light_data_set
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(path))
    ctx = env.context
    assert isinstance(ctx, SurrogateContext) and not hasattr(ctx, "model")
    assert env.unit_names == exact.unit_names and [u.numel for u in env.units] == [u.numel for u in exact.units]
    assert env.profile.z_wanda == list(exact.context.z_wanda) and env.reference.ppl == exact.context.dense.ppl
    lent = LayerPruneEnv(context=exact.context, fidelity="surrogate", surrogate=str(path))
    for value in (0.1, 0.9):
        episodes = []
        for played in (env, lent):
            played.reset(seed=0)
            for _ in played.units:
                obs, reward, done, _, info = played.step(np.array([value], dtype=np.float32))
            episodes.append((obs.tolist(), reward, info))
        assert episodes[0] == episodes[1]  # the light context and the model-backed one: the same numbers


def test_model_arguments_the_data_set_was_not_built_for_are_refused(light_data_set, tiny_data):
    from prune_env.surrogate import SurrogateMismatchError

    path, _ = light_data_set
    for kwargs in (dict(model="tiny-llama-5"), dict(method="magnitude"), dict(data={**tiny_data, "n_facts": 9}),
                   dict(dtype="bfloat16")):
        with pytest.raises(SurrogateMismatchError, match=f"was built for .*{next(iter(kwargs))}="):
            LayerPruneEnv(**{"model": "tiny-llama", "data": tiny_data, **kwargs}, fidelity="surrogate",
                          surrogate=str(path))


def test_a_variance_penalty_sees_the_allocation_on_the_surrogate(light_data_set, tiny_data):
    """A reward term reads the allocation, not the weights: the surrogate (which prunes none) reports the same
    nonzero value as the exact env for the same allocation."""
    import uuid

    from prune_env.envs.plugins import register_reward_term

    name = f"variance-{uuid.uuid4().hex[:8]}"
    register_reward_term(name, lambda metrics, allocation, env: -float(np.var(allocation)))
    path, _ = light_data_set
    values = []
    for fidelity in ("exact", "surrogate"):
        env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity=fidelity, surrogate=str(path),
                            reward_mode="vector", reward={"terms": {name: 1.0}})
        env.reset(seed=0)
        for value in (0.05, 0.9, 0.5):
            *_, vector, _, _, info = env.step(np.array([value], dtype=np.float32))
        values.append((vector[2], info["allocation"]))
    (exact_term, exact_allocation), (surrogate_term, surrogate_allocation) = values
    assert surrogate_allocation == exact_allocation
    assert surrogate_term == exact_term == -float(np.var(exact_allocation)) and surrogate_term < -0.01


def test_light_envs_pickle_close_and_cost_no_model(light_data_set, tiny_data):
    """In a fresh process: four surrogate envs load no model, add < 100 MB of peak memory to the import, and
    leave no file open once closed; an env pickles and its copy plays the same episode."""
    import json
    import os
    import subprocess
    import sys

    path, _ = light_data_set
    code = """
import json, os, pickle, resource, sys
import numpy as np
import prune_env.envs.layer
from prune_env import context
kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fds = lambda: len(os.listdir("/proc/self/fd"))
base_kb, base_fds = kb(), fds()
envs = [prune_env.envs.layer.LayerPruneEnv(model="tiny-llama", data=json.loads(sys.argv[1]), fidelity="surrogate",
                                    surrogate=sys.argv[2]) for _ in range(4)]
def episode(env):
    env.reset(seed=0)
    return [env.step(np.array([v], dtype=np.float32))[1] for v in (0.2, 0.7, 0.4)]
copy = pickle.loads(pickle.dumps(envs[0]))
same = episode(copy) == episode(envs[0])
for env in envs:
    env.close()
print(json.dumps({"grew_kb": kb() - base_kb, "open": fds() - base_fds, "templates": len(context._TEMPLATES),
                  "same": same}))
"""
    done = subprocess.run([sys.executable, "-c", code, json.dumps(tiny_data), str(path)], capture_output=True,
                          text=True, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["templates"] == 0 and result["open"] <= 0 and result["same"]
    assert result["grew_kb"] < 100 * 1024


def test_a_users_surrogate_has_no_normalised_score(light_data_set, tiny_data, monkeypatch):
    """The reference table's surrogate rows come from the packaged data set: another one's returns are not
    comparable, even for a task the table has."""
    from prune_env.envs import reference

    monkeypatch.setattr(reference, "task_for", lambda context, fidelity, reward: "smollm2-135m/wanda/block/exact")
    path, _ = light_data_set
    for fidelity, expected_none in (("surrogate", True), ("exact", False)):
        env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity=fidelity, surrogate=str(path))
        env.reset(seed=0)
        for _ in env.units:
            *_, info = env.step(np.array([0.5], dtype=np.float32))
        assert (info["normalised_score"] is None) == expected_none


def test_the_packaged_surrogate_builds_a_smollm2_env_without_the_model():
    """The packaged data set predates the balanced knowledge fields: the env must still build (it once raised
    a TypeError from Metrics), and the missing dense fields read NaN, not 0."""
    import gymnasium as gym

    env = gym.make("prune_env/LayerPrune-v1", fidelity="surrogate")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    dense = env.unwrapped.context.dense
    assert dense.ppl > 1 and math.isnan(dense.fact_retention_balanced)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.unwrapped.action_for_ratio(0.5))
        done = terminated or truncated
    assert math.isfinite(reward) and info["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert info["normalised_score"] == pytest.approx(0.0, abs=1e-3)  # uniform is the reference zero
    env.close()
