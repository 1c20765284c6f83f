"""IterativePrune-v0 on the tiny random Llama: API checks, exact target, rollback, determinism, profile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prune_env.context import profile_table
from prune_env.envs.iterative import IterativePruneEnv
from prune_env.pruning.masking import wanda_scores
from prune_env.models import weight_matrix
from prune_env.envs.rewards import RewardConfig


@pytest.fixture(scope="module")
def data(tiny_data):
    """conftest's generated text and facts (its session fixture also isolates the profile cache)."""
    return tiny_data


def make(data, **kwargs) -> IterativePruneEnv:
    return IterativePruneEnv(model="tiny-llama", data=data, **kwargs)


@pytest.fixture(scope="module")
def env(data):
    """Never reverts, so episodes are driven by the actions alone. Every test resets it first."""
    return make(data, rollback_threshold=math.inf)


def live_weights(env) -> dict[str, torch.Tensor]:
    return {ref.name: weight_matrix(ref.module).detach().clone() for ref in env.context.refs}


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def run(env, actions, **reset_kwargs):
    obs, info = env.reset(**reset_kwargs)
    out = [(obs, 0.0, False, False, info)]
    for action in actions:
        out.append(env.step(action))
        if out[-1][2] or out[-1][3]:
            break
    return out


# ----------------------------------------------------------------------------- API conformance


def test_gymnasium_and_sb3_env_checkers(data):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    block = make(data)
    check_env(block, skip_render_check=True)
    linear = make(data, granularity="linear")
    sb3_check_env(linear)
    obs, _ = linear.reset(seed=0)
    assert linear.action_space.n == len(linear.units) == 21
    assert obs.shape == (5 * 21 + 6,) and obs.dtype == np.float32
    # per-linear units hit the target exactly too (7 steps of 0.05, the last one scaled down)
    linear.rollback_threshold = math.inf
    steps = run(linear, [np.ones(21, dtype=np.int8)] * 10, seed=0, options={"target_sparsity": 0.33})
    assert len(steps) - 1 == 7 and steps[-1][2]
    pruned = sum(int((weight_matrix(ref.module) == 0).sum()) for ref in linear.context.refs)
    assert pruned == math.ceil((0.33 - 1e-9) * linear.context.total_numel)


def test_registered_with_gymnasium(data):
    import gymnasium as gym

    env = gym.make("prune_env/IterativePrune-v0", model="tiny-llama", data=data, render_mode="ansi")
    assert isinstance(env.unwrapped, IterativePruneEnv)
    env.reset(seed=0)
    env.step(np.ones(3, dtype=np.int8))
    assert "block.2" in env.render()


def test_render_modes(data):
    env = make(data, render_mode="ansi")
    env.reset(seed=0)
    env.step(np.ones(3, dtype=np.int8))
    text = env.render()
    assert "block.0" in text and "target 0.500" in text


# ----------------------------------------------------------------------------- dynamics


@pytest.mark.parametrize("target", [0.5, 0.33])
def test_all_ones_reaches_target_exactly(env, target):
    steps = run(env, [np.ones(3, dtype=np.int8)] * 20, seed=0, options={"target_sparsity": target})
    obs, _, terminated, truncated, info = steps[-1]
    total = env.context.total_numel
    assert terminated and not truncated
    assert len(steps) - 1 == math.ceil(target / env.increment - 1e-9)
    assert target - 1e-9 <= info["achieved_sparsity"] <= target + len(env.units) / total
    pruned = sum(int((weight_matrix(ref.module) == 0).sum()) for ref in env.context.refs)
    assert pruned == round(info["achieved_sparsity"] * total) == math.ceil((target - 1e-9) * total)
    assert env.context.achieved_sparsity() == pytest.approx(info["achieved_sparsity"], abs=0)
    assert env.global_sparsity == info["achieved_sparsity"]
    # the last step was scaled uniformly: the equal-sized blocks end within two weights of each other
    alloc = info["allocation"]
    assert max(alloc) - min(alloc) <= 2 / min(u.numel for u in env.units) + 1e-12
    # undiscounted return telescopes to the final quality (no rollbacks here)
    assert sum(step[1] for step in steps) == pytest.approx(info["quality"], abs=1e-12)
    assert obs[-4] == pytest.approx(target - info["achieved_sparsity"], abs=1e-6)  # budget left
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(3, dtype=np.int8))


def test_noop_and_capped_steps_change_nothing(data):
    env = make(data, rollback_threshold=math.inf, target_sparsity=0.5, max_sparsity=0.5, increment=0.3)
    env.reset(seed=0)
    _, reward, *_, info = env.step(np.zeros(3, dtype=np.int8))
    assert reward == 0.0 and info["changed"] == [] and info["achieved_sparsity"] == 0.0
    env.step(np.array([1, 0, 0]))
    _, _, _, _, info = env.step(np.array([1, 0, 0]))  # 0.3 -> 0.5, the cap
    assert info["allocation"][0] == 0.5
    before = live_weights(env)
    _, reward, terminated, _, info = env.step(np.array([1, 0, 0]))  # capped: nothing to do
    assert reward == 0.0 and info["changed"] == [] and not terminated
    assert bit_equal(before, live_weights(env))


def test_truncation_after_max_steps(data):
    env = make(data, max_steps=2)
    env.reset(seed=0)
    assert env.step(np.zeros(3, dtype=np.int8))[2:4] == (False, False)
    assert env.step(np.zeros(3, dtype=np.int8))[2:4] == (False, True)
    with pytest.raises(RuntimeError, match=r"call reset\(\)"):
        env.step(np.zeros(3, dtype=np.int8))


def test_rollback_restores_masks_and_weights_bit_exactly(data):
    env = make(data, rollback_threshold=1e-9, increment=0.2, reward={"rollback_penalty": 0.25})
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(8):
        weights, masks = live_weights(env), dict(env.context.masked.masks)
        before_table, before_obs = env.profile_table(), env._observation()
        action = rng.integers(0, 2, 3)
        action[rng.integers(0, 3)] = 1
        obs, reward, _, _, info = env.step(action)
        if info["rolled_back"]:
            break
    else:
        pytest.fail("no step raised perplexity on the tiny model: the rollback path was never taken")
    assert info["ppl_increase"] > 1e-9 and reward == -0.25 and info["rollbacks"] == 1 and info["changed"]
    assert bit_equal(weights, live_weights(env))
    assert masks.keys() == env.context.masked.masks.keys()
    assert all(torch.equal(masks[k], env.context.masked.masks[k]) for k in masks)
    assert env.profile_table() == before_table
    np.testing.assert_array_equal(obs[:-1], before_obs[:-1])
    assert obs[-1] == pytest.approx(1 / env.max_steps)


def test_reset_restores_dense_weights_bit_exactly(env):
    env.reset(seed=0)
    dense = live_weights(env)
    assert bit_equal(dense, env.context.masked.dense)  # the snapshot taken when the model was first loaded
    run(env, [np.array([1, 0, 1]), np.ones(3, dtype=np.int8)], seed=0)
    assert not bit_equal(dense, live_weights(env))
    obs, info = env.reset(seed=1)
    assert bit_equal(dense, live_weights(env))
    assert info["achieved_sparsity"] == 0.0 and env.context.masked.masks == {}
    assert info["ppl"] == env.context.dense.ppl


def test_same_seed_and_actions_give_same_infos(env):
    actions = [np.array(a) for a in ([1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1])]
    first = run(env, actions, seed=3, options={"target_sparsity": 0.3})
    second = run(env, actions, seed=3, options={"target_sparsity": 0.3})
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]


def test_checkpoint_and_rollback(env):
    env.reset(seed=0)
    env.step(np.array([1, 1, 0]))
    cp, weights, table = env.checkpoint(), live_weights(env), env.profile_table()
    env.step(np.array([0, 1, 1]))
    env.step(np.ones(3, dtype=np.int8))
    env.rollback(cp)
    assert bit_equal(weights, live_weights(env)) and env.profile_table() == table
    assert env.step(np.zeros(3, dtype=np.int8))[4]["step"] == 2


# ----------------------------------------------------------------------------- errors


def test_bad_constructor_arguments(data):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*valid options"):
        make(data, bogus=1)
    for bad in (1.2, 0.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="target_sparsity"):
            make(data, target_sparsity=bad)
    with pytest.raises(ValueError, match="max_sparsity"):
        make(data, target_sparsity=0.6, max_sparsity=0.5)
    for bad in (0.0, -0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="increment"):
            make(data, increment=bad)
    with pytest.raises(ValueError, match="rollback_threshold"):
        make(data, rollback_threshold=float("nan"))
    with pytest.raises(ValueError, match="unknown reward option"):
        make(data, reward={"penalty": 1})
    assert RewardConfig().rollback_penalty == 0.1


def test_bad_reset_and_actions(env, data):
    fresh = make(data)
    with pytest.raises(RuntimeError, match=r"call reset\(\)"):
        fresh.step(np.zeros(3, dtype=np.int8))
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['target'\]"):
        env.reset(options={"target": 0.5})
    for bad in (1.2, float("nan")):
        with pytest.raises(ValueError, match="target_sparsity"):
            env.reset(options={"target_sparsity": bad})
    with pytest.raises(ValueError, match="above max_sparsity"):
        env.reset(options={"target_sparsity": 0.95})
    env.reset(seed=0)
    for bad in (np.ones(4), np.ones((1, 3)), 1, [1, 0, 2], [0.5, 0, 1], [float("nan"), 0, 1], "abc", ["1", "0", "0"],
                [1 + 0j, 0, 0]):
        with pytest.raises(ValueError, match=r"MultiBinary\(3\)"):
            env.step(bad)
    with pytest.raises(ValueError, match=r"\[2.0\] are not 0 or 1"):
        env.step([1, 0, 2])
    with pytest.raises(ValueError, match="contains NaN"):
        env.step([float("nan"), 0, 1])
    with pytest.raises(ValueError, match="not numbers"):
        env.step(["1", "0", "0"])
    assert env.step([True, False, False])[4]["changed"] == [0]  # bools and lists are in the space


# ----------------------------------------------------------------------------- profile for LLM agents


def independent_z_wanda(env) -> np.ndarray:
    """s_u = lower 10th percentile of the unit's non-zero |W_live| * ||X||_2, z-scored across units."""
    values = []
    for unit in env.units:
        scores = torch.cat([wanda_scores(weight_matrix(ref.module), env.context.stats.act_norm[ref.name]).reshape(-1)
                            for ref in unit.linears])
        scores = np.sort(scores[scores != 0].double().numpy())
        values.append(scores[int(0.1 * (scores.size - 1))])
    values = np.asarray(values)
    return (values - values.mean()) / (values.std() + 1e-8)


def test_profile_table_and_live_z_wanda(env):
    obs, _ = env.reset(seed=0)
    table = env.profile_table()
    assert [list(row) for row in table] == [["unit", "index", "z_wanda", "z_grad", "sparsity", "param_share"]] * 3
    assert [row["unit"] for row in table] == env.unit_names == ["block.0", "block.1", "block.2"]
    dense_z = [row["z_wanda"] for row in table]
    np.testing.assert_allclose(dense_z, independent_z_wanda(env), rtol=1e-6, atol=1e-6)
    # the one implementation: the dense rows the one-shot LLM agent reads are the env's rows at reset
    assert [{**row, "z_wanda": pytest.approx(row["z_wanda"], abs=1e-6)} for row in profile_table(env.context)] == table
    obs, *_ = env.step(np.array([1, 0, 0]))
    obs, *_, info = env.step(np.array([1, 1, 0]))
    table = env.profile_table()
    live_z = [row["z_wanda"] for row in table]
    np.testing.assert_allclose(live_z, independent_z_wanda(env), rtol=1e-6, atol=1e-6)
    assert not np.allclose(live_z, dense_z, atol=1e-3)  # recomputed: pruning raised block 0's percentile
    assert [row["sparsity"] for row in table] == info["allocation"] == pytest.approx([0.1, 0.05, 0.0], abs=1e-3)
    assert sum(row["param_share"] for row in table) == pytest.approx(1.0)
    np.testing.assert_allclose(obs[0:15:5], live_z, atol=1e-5)
    np.testing.assert_allclose(obs[1:15:5], env.context.z_grad, atol=1e-5)
    np.testing.assert_allclose(obs[2:15:5], info["allocation"], atol=1e-6)
    np.testing.assert_allclose(obs[3:15:5], [0.0, 0.5, 1.0])
    glob = info["achieved_sparsity"]
    expected = [glob, 0.5, 0.5 - glob, math.log(info["ppl"] / env.context.dense.ppl),
                env.context.dense.fact_acc - info["fact_acc"], 0.0]
    np.testing.assert_allclose(obs[15:], expected, atol=1e-6)
    assert (env.target_sparsity, env.max_sparsity, env.increment) == (0.5, 0.9, 0.05)


# ----------------------------------------------------------------------------- rewards that pay for the target


def returns(env, actions, target):
    steps = run(env, actions, seed=0, options={"target_sparsity": target})
    return sum(step[1] for step in steps[1:]), steps[-1]


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_do_nothing_and_stop_early_pay_for_the_unmet_budget(data, target):
    env = make(data, rollback_threshold=math.inf, max_steps=12)  # 12 steps: uniform increments reach 0.5 in 10
    ones, zeros = np.ones(3, dtype=np.int8), np.zeros(3, dtype=np.int8)
    uniform, (*_, terminated, _, info) = returns(env, [ones] * 12, target)
    assert terminated and info["unmet_penalty"] == 0.0
    nothing, (_, reward, terminated, truncated, info) = returns(env, [zeros] * 12, target)
    assert truncated and not terminated and info["achieved_sparsity"] == 0.0
    assert reward == nothing == pytest.approx(-env.unmet_penalty * target, abs=1e-12)
    early, (*_, truncated, info) = returns(env, [ones] * 2 + [zeros] * 10, target)
    unmet = target - info["achieved_sparsity"]
    assert truncated and unmet >= target - 2 * env.increment - 1e-6
    assert info["unmet_penalty"] == pytest.approx(env.unmet_penalty * unmet, abs=1e-12)
    assert early == pytest.approx(info["quality"] - info["unmet_penalty"], abs=1e-12)  # still telescopes
    assert nothing < uniform - 1.0 and early < uniform - 1.0  # each pays clearly more than pruning costs here


def test_registered_versions_and_the_penalty_option(data):
    import gymnasium as gym

    zeros = np.zeros(8, dtype=np.int8)
    for version, penalty in (("v1", 0.0), ("v2", 20.0)):
        env = gym.make(f"prune_env/IterativePrune-{version}", model="tiny-llama", data=data, max_steps=1,
                       target_sparsity=0.4)
        assert env.unwrapped.unmet_penalty == penalty
        env.reset(seed=0)
        assert env.step(zeros)[1] == pytest.approx(-penalty * 0.4)  # v1 keeps its published reward
    assert gym.spec("prune_env/IterativePrune-v0").kwargs["unmet_penalty"] == 0.0
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="unmet_penalty"):
            make(data, unmet_penalty=bad)
    with pytest.raises(ValueError, match="reward_mode 'vectors'.*scalar, vector"):
        make(data, reward_mode="vectors")


def test_vector_reward_scalarises_to_the_scalar_reward(data):
    from gymnasium.utils.env_checker import check_env

    from prune_env.envs.wrappers import LinearizeReward

    kwargs = dict(rollback_threshold=1e-9, increment=0.2, max_steps=8, reward={"rollback_penalty": 0.3})
    vector_env = make(data, reward_mode="vector", **kwargs)
    check_env(vector_env, skip_render_check=True)
    assert vector_env.reward_space.shape == (2,)
    rng = np.random.default_rng(0)  # the rollback test's actions: they raise perplexity at some step
    actions = [rng.integers(0, 2, 3) for _ in range(8)]
    scalar_steps = run(make(data, **kwargs), actions, seed=0, options={"target_sparsity": 0.8})
    linear = LinearizeReward(vector_env, [1.0, 1.0])
    linear.reset(seed=0, options={"target_sparsity": 0.8})
    vectors = []
    for action, expected in zip(actions, scalar_steps[1:]):
        _, reward, terminated, truncated, info = linear.step(action)
        vectors.append(info["vector_reward"])
        assert reward == pytest.approx(expected[1], abs=1e-12) and (terminated, truncated) == expected[2:4]
    assert scalar_steps[-1][3] and any(step[4]["rolled_back"] for step in scalar_steps[1:])  # both penalties paid
    final = scalar_steps[-1][4]
    assert np.sum(vectors, axis=0)[1] == pytest.approx(final["fact_acc"] - vector_env.reference.fact_acc, abs=1e-12)


def test_layer_prune_do_nothing_and_stop_early_still_end_on_the_target(data):
    """LayerPrune's action wall: asking for 0 everywhere (or after a few units) still ends on the target."""
    import gymnasium as gym

    env = gym.make("prune_env/LayerPrune-v1", model="tiny-llama", data=data, fidelity="proxy")
    for prefix in (0, 1):
        env.reset(seed=0, options={"target_sparsity": 0.5})
        done, step = False, 0
        while not done:
            ratio = 0.5 if step < prefix else 0.0
            _, _, done, _, info = env.step(env.unwrapped.action_for_ratio(ratio))
            step += 1
        assert abs(info["achieved_sparsity"] - 0.5) <= len(env.unwrapped.units) / env.unwrapped.context.total_numel
