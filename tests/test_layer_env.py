"""LayerPrune-v0 on tiny-llama: API checks, exact budgets, observations recomputed independently,
checkpoint/rollback, determinism and input errors."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import prune_env  # noqa: F401  (registers the environments)
from prune_env.models import decoder_blocks, linear_layers, weight_matrix

ENV_ID = "prune_env/LayerPrune-v0"
KINDS = sorted({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})


@pytest.fixture(scope="module")
def make_env(tiny_data):
    """gym.make with the tiny data; one env per set of arguments per module (each owns its model)."""
    made: dict = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            kwargs.setdefault("proxy_eval_tokens", 128)
            kwargs.setdefault("proxy_facts", 6)
            made[key] = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, **kwargs)
        return made[key]

    return make


def live_zeros(env) -> dict[str, int]:
    return {ref.name: int((weight_matrix(ref.module) == 0).sum()) for ref in linear_layers(env.unwrapped.context.model)}


def run_episode(env, actions, seed=0, options=None):
    obs, info = env.reset(seed=seed, options=options)
    observations, infos, rewards = [obs], [info], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        infos.append(info)
        rewards.append(reward)
        assert not truncated
    assert terminated
    return observations, rewards, infos


def actions_for(env, kind: str, seed: int = 0) -> list:
    n = len(env.unwrapped.units)
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        values = {"zero": [0] * n, "one": [space.n - 1] * n,
                  "random": np.random.default_rng(seed).integers(0, space.n, n).tolist()}
        return values[kind]
    values = {"zero": np.zeros(n), "one": np.ones(n), "random": np.random.default_rng(seed).random(n)}[kind]
    return [np.array([v], dtype=np.float32) for v in values]


# ----------------------------------------------------------------------------- API checkers

@pytest.mark.parametrize("fidelity", ["exact", "proxy"])
@pytest.mark.parametrize("granularity", ["block", "linear"])
def test_gymnasium_and_sb3_checkers(make_env, fidelity, granularity):
    env = make_env(fidelity=fidelity, granularity=granularity)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True)


def test_checkers_discrete(make_env):
    env = make_env(action_type="discrete", n_actions=5)
    assert env.action_space == gym.spaces.Discrete(5)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True)


def test_spaces_and_units(make_env):
    for granularity, n_units, obs_dim in (("block", 3, 9), ("linear", 21, 9 + len(KINDS))):
        env = make_env(granularity=granularity)
        refs = linear_layers(env.unwrapped.context.model)
        expected = ([f"block.{b}" for b in range(3)] if granularity == "block" else [ref.name for ref in refs])
        assert env.unwrapped.unit_names == expected
        assert len(env.unwrapped.units) == n_units
        assert env.observation_space.shape == (obs_dim,)
        assert env.action_space == gym.spaces.Box(0.0, 1.0, (1,), np.float32)


# ----------------------------------------------------------------------------- exact budget

@pytest.mark.parametrize("config", [dict(granularity="block"), dict(granularity="linear"),
                                    dict(fidelity="proxy", granularity="linear"), dict(fidelity="proxy"),
                                    dict(action_type="discrete"), dict(granularity="linear", target_sparsity=0.3,
                                                                       min_sparsity=0.1, max_sparsity=0.6)])
@pytest.mark.parametrize("kind", ["random", "zero", "one"])
def test_target_is_met(make_env, config, kind):
    env = make_env(**config)
    u = env.unwrapped
    _, _, infos = run_episode(env, actions_for(env, kind))
    zeros = live_zeros(env)
    total = sum(ref.numel for ref in linear_layers(u.context.model))
    n_linears = len(zeros)
    target = config.get("target_sparsity", 0.5)
    assert abs(sum(zeros.values()) - target * total) <= n_linears
    final = infos[-1]
    assert final["achieved_sparsity"] == pytest.approx(sum(zeros.values()) / total, abs=1e-12)
    # the allocation reports each unit's real sparsity, within [min, max] up to rounding
    lo, hi = config.get("min_sparsity", 0.0), config.get("max_sparsity", 0.9)
    for unit, ratio in zip(u.units, final["allocation"]):
        unit_zeros = sum(zeros[ref.name] for ref in unit.linears)
        assert ratio == pytest.approx(unit_zeros / unit.numel, abs=1e-12)
        assert lo - len(unit.linears) / unit.numel <= ratio <= hi + len(unit.linears) / unit.numel
    for key in ("ppl", "fact_acc", "fact_nll", "fact_retention", "quality"):
        assert math.isfinite(final[key])


def test_reset_target_option_changes_sparsity(make_env):
    env = make_env(granularity="linear")
    actions = actions_for(env, "random", seed=3)
    _, _, infos = run_episode(env, actions, options={"target_sparsity": 0.3})
    assert infos[0]["target_sparsity"] == 0.3
    low = infos[-1]["achieved_sparsity"]
    _, _, infos = run_episode(env, actions)  # no option: back to the constructor's target
    assert infos[0]["target_sparsity"] == 0.5
    total = env.unwrapped.context.total_numel
    assert abs(low * total - 0.3 * total) <= 21
    assert abs(infos[-1]["achieved_sparsity"] * total - 0.5 * total) <= 21


# ----------------------------------------------------------------------------- observations

def independent_profile(env):
    """s_u, g_u z-scores from own hooks and own gradients on the dense model (not ctx.stats)."""
    u = env.unwrapped
    ctx = u.context
    model = ctx.model
    refs = linear_layers(model)
    calib = ctx.slices.calibration
    inputs = {ref.name: [] for ref in refs}
    handles = [ref.module.register_forward_hook(
        lambda _m, args, _o, name=ref.name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for ref in refs]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for handle in handles:
        handle.remove()
    norms = {name: torch.cat(xs).double().pow(2).sum(0).sqrt() for name, xs in inputs.items()}
    grad_sum = {ref.name: torch.zeros_like(ref.module.weight, dtype=torch.float64) for ref in refs}
    samples = ctx.data.grad_samples
    with torch.enable_grad():
        for row in calib[:samples]:
            loss = model(input_ids=row[None], labels=row[None], use_cache=False).loss
            grads = torch.autograd.grad(loss, [ref.module.weight for ref in refs])
            for ref, grad in zip(refs, grads):
                grad_sum[ref.name] += grad.abs().double()
    s, g = [], []
    for unit in u.units:
        scores = np.concatenate([(weight_matrix(ref.module).detach().abs().double() * norms[ref.name][None, :])
                                 .reshape(-1).numpy() for ref in unit.linears])
        scores = np.sort(scores[scores != 0])
        s.append(scores[int(0.1 * (scores.size - 1))])
        g.append(sum(float(grad_sum[ref.name].sum()) for ref in unit.linears) / (unit.numel * samples))

    def z(values):
        v = np.asarray(values, dtype=np.float64)
        return (v - v.mean()) / (v.std() + 1e-8)

    return norms, z(s), z(g)


def block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    handles = [block.register_forward_hook(
        lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
        for block in decoder_blocks(model)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("fidelity", ["exact", "proxy"])
@pytest.mark.parametrize("granularity", ["block", "linear"])
def test_observations_match_independent_computation(make_env, fidelity, granularity):
    env = make_env(fidelity=fidelity, granularity=granularity)
    u = env.unwrapped
    obs, _ = env.reset(seed=0)
    model = u.context.model
    norms, z_wanda, z_grad = independent_profile(env)
    for name, norm in norms.items():  # the profile's activation statistics are the dense ones
        assert torch.allclose(u.context.stats.act_norm[name].double(), norm, rtol=1e-5)
    calib0 = u.context.slices.calibration[:u.context.data.batch_size]
    dense_out = block_outputs(model, calib0)
    units, total = u.units, sum(ref.numel for ref in linear_layers(model))
    n = len(units)
    prev_ratio, last_drop = 0.0, 0.0
    info: dict = {}  # the last step's info, read once the episode has ended
    actions = actions_for(env, "random", seed=1)
    for step in range(n + 1):
        index = min(step, n - 1)
        zeros = sum(live_zeros(env).values())
        done_numel = sum(unit.numel for unit in units[index:])
        expected = [z_wanda[index], z_grad[index], 0.0 if step < n else info["ratio"], index / (n - 1),
                    units[index].numel / total, zeros / total,
                    (0.5 * total - zeros) / done_numel, prev_ratio, last_drop]
        if granularity == "linear":
            expected += [float(units[index].kind == kind) for kind in KINDS]
        assert obs.dtype == np.float32 and obs in env.observation_space
        np.testing.assert_allclose(obs, np.clip(expected, -10, 10), rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
        if step == n:
            break
        obs, _, _, _, info = env.step(actions[step])
        unit = units[step]
        # prev_action is the ratio asked for; the unit's realised ratio differs by rounding only
        prev_ratio = float(obs[7])
        assert abs(prev_ratio - info["ratio"]) <= len(unit.linears) / unit.numel + 1e-6
        block = unit.linears[0].block_index
        end_of_block = step == n - 1 or units[step + 1].linears[0].block_index != block
        if fidelity == "exact" and end_of_block:
            out = block_outputs(model, calib0)[block]
            last_drop = float((out - dense_out[block]).norm() / dense_out[block].norm())


# ----------------------------------------------------------------------------- reset, rollback, determinism

def dense_snapshot(env) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in env.unwrapped.context.model.state_dict().items()}


@pytest.mark.parametrize("fidelity", ["exact", "proxy"])
def test_reset_restores_dense_weights(make_env, fidelity):
    env = make_env(fidelity=fidelity)
    env.reset(seed=0)
    dense = dense_snapshot(env)
    run_episode(env, actions_for(env, "one"))
    assert sum(live_zeros(env).values()) > 0
    env.reset(seed=0)
    for key, value in env.unwrapped.context.model.state_dict().items():
        assert torch.equal(value, dense[key]), key
    assert env.unwrapped.context.masked.masks == {}


@pytest.mark.parametrize("config,cut", [(dict(granularity="block"), 1), (dict(granularity="linear"), 2),
                                        (dict(granularity="linear"), 7), (dict(granularity="linear"), 10),
                                        (dict(granularity="linear", fidelity="proxy"), 5)])
def test_checkpoint_rollback(make_env, config, cut):
    env = make_env(**config)
    u = env.unwrapped
    n = len(u.units)
    # strong early pruning, so block statistics after a mid-block rollback would visibly differ
    actions = [np.array([1.0], np.float32)] * cut + actions_for(env, "random", seed=2)[cut:]
    _, _, straight = run_episode(env, actions)
    straight_masks = {k: v.clone() for k, v in u.context.masked.masks.items()}

    obs, _ = env.reset(seed=0)
    for action in actions[:cut]:
        obs, *_ = env.step(action)
    checkpoint = u.checkpoint()
    masks = {k: v.clone() for k, v in u.context.masked.masks.items()}
    weights = dense_snapshot(env)
    for _ in range(min(3, n - cut - 1)):
        env.step(np.array([0.2], np.float32))
    u.rollback(checkpoint)
    assert u.context.masked.masks.keys() == masks.keys()
    assert all(torch.equal(u.context.masked.masks[k], masks[k]) for k in masks)
    for key, value in u.context.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert np.array_equal(u._observation(), obs)
    for action in actions[cut:]:
        _, _, terminated, _, info = env.step(action)
    assert terminated
    assert info == straight[-1]
    assert all(torch.equal(u.context.masked.masks[k], straight_masks[k]) for k in straight_masks)


def test_same_seed_and_actions_same_infos(make_env, tiny_data):
    env = make_env(granularity="linear")
    actions = actions_for(env, "random", seed=4)
    first = run_episode(env, actions, seed=11)
    second = run_episode(env, actions, seed=11)
    assert first[2] == second[2] and first[1] == second[1]
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0]))
    other = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, granularity="linear")  # a fresh instance
    third = run_episode(other, actions, seed=11)
    assert third[2] == first[2]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(bogus=1), r"unknown option\(s\) \['bogus'\].*target_sparsity"),
    (dict(target_sparsity=1.5), r"target_sparsity=1.5 is outside the allowed range \(0, 1\)"),
    (dict(target_sparsity=0), r"target_sparsity=0 is outside the allowed range \(0, 1\)"),
    (dict(target_sparsity=float("nan")), r"target_sparsity=nan is not a number: give a number in \(0, 1\)"),
    (dict(target_sparsity="0.5"), r"target_sparsity='0.5' is not a number"),
    (dict(min_sparsity=0.6, max_sparsity=0.4), "min_sparsity <= max_sparsity"),
    (dict(max_sparsity=1.0), r"max_sparsity=1.0 is outside the allowed range \[0, 1\)"),
    (dict(min_sparsity=float("nan")), "min_sparsity"),
    (dict(target_sparsity=0.95), "target_sparsity 0.95 is above max_sparsity 0.9"),
    (dict(fidelity="fast"), "unknown fidelity 'fast'"),
    (dict(action_type="multi"), "unknown action_type 'multi'"),
    (dict(render_mode="video"), "unknown render_mode 'video'"),
    (dict(reward={"ppl_wieght": 1}), r"unknown reward option\(s\) \['ppl_wieght'\]"),
    (dict(data={"calib_sample": 4}), r"unknown data option\(s\) \['calib_sample'\]"),
    (dict(method="obs"), "unknown pruning method 'obs'"),
    (dict(granularity="head"), "unknown granularity 'head'"),
])
def test_bad_constructor_arguments(tiny_data, kwargs, message):
    data = kwargs.pop("data", tiny_data)
    with pytest.raises(ValueError, match=message):
        gym.make(ENV_ID, model="tiny-llama", data=data, **kwargs)


@pytest.mark.parametrize("options,message", [
    ({"target": 0.3}, r"unknown reset option\(s\) \['target'\]"),
    ({"target_sparsity": 1.5}, r"target_sparsity=1.5 is outside the allowed range \(0, 1\)"),
    ({"target_sparsity": float("nan")}, r"target_sparsity=nan is not a number"),
    ({"target_sparsity": 0.95}, "above max_sparsity"),
    ({"target_sparsity": 0.3, "target_sparsity_range": (0.2, 0.4)}, "not both"),
    ({"target_sparsity_range": (0.4, 0.2)}, "lo <= hi"),
    ({"target_sparsity_range": 0.3}, r"must be a pair \(lo, hi\)"),
])
def test_bad_reset_options(make_env, options, message):
    # unwrapped: gymnasium's PassiveEnvChecker cannot check a first step after its first reset raised
    env = make_env().unwrapped
    with pytest.raises(ValueError, match=message):
        env.reset(options=options)


@pytest.mark.parametrize("action", [np.array([np.nan], np.float32), np.array([0.1, 0.2], np.float32),
                                    np.array([np.inf], np.float32), float("nan"), "0.5", np.array(["0.5"]), True,
                                    np.array([True]), 0.5 + 0j, np.array([0.5 + 0j]), np.array([[0.5]], np.float32),
                                    [[0.5]], None])
def test_bad_continuous_actions(make_env, action):
    env = make_env().unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)
    # nothing happened: the episode still takes every unit
    assert env._step == 0 and env.context.masked.masks == {}
    _, _, infos = run_episode(env, actions_for(env, "random"))
    assert len(infos) == len(env.units) + 1


@pytest.mark.parametrize("value,bound", [(1.5, 1.0), (-0.2, 0.0), (7.0, 1.0), (-1e9, 0.0)])
def test_continuous_actions_outside_the_box_are_clipped(make_env, value, bound):
    """Like other Box envs: an action past a bound acts as the bound (NaN and inf are still refused)."""
    env = make_env().unwrapped
    rng = np.random.default_rng(3)
    rest = [np.array([v], np.float32) for v in rng.random(len(env.units) - 1)]
    _, outside_rewards, outside = run_episode(env, [np.array([value], np.float32), *rest])
    _, rewards, clipped = run_episode(env, [np.array([bound], np.float32), *rest])
    assert outside == clipped and outside_rewards == rewards
    assert outside[1]["ratio"] == pytest.approx(0.9 if bound else 0.0, abs=1e-3)


@pytest.mark.parametrize("action", [11, -1, 1.5, float("nan"), np.array([1, 2]), "3", True, 3 + 0j])
def test_bad_discrete_actions(make_env, action):
    env = make_env(action_type="discrete").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"not in Discrete\(11\)"):
        env.step(action)
    assert env._step == 0
    env.step(np.int64(3))  # integer indices are fine
    env.step(np.array([4]))


def test_step_before_reset_and_after_end(tiny_data, make_env):
    fresh = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, granularity="block")
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        fresh.step(np.array([0.5], np.float32))
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        fresh.unwrapped.step(np.array([0.5], np.float32))
    env = make_env()
    run_episode(env, actions_for(env, "random"))
    with pytest.raises(RuntimeError, match="episode has ended"):
        env.unwrapped.step(np.array([0.5], np.float32))


# ----------------------------------------------------------------------------- render

def test_render_modes(make_env):
    env = make_env(render_mode="ansi")
    env.reset(seed=0)
    env.step(np.array([0.8], np.float32))
    text = env.render()
    assert isinstance(text, str)
    lines = text.strip().splitlines()
    assert lines[0].split() == ["unit", "ratio", "z_wanda", "z_grad"]
    assert [line.split()[0] for line in lines[1:4]] == ["block.0", "block.1", "block.2"]
    assert float(lines[1].split()[1]) == pytest.approx(env.unwrapped._ratios[0], abs=1e-3)
    assert lines[-1] == "target 0.500"
    image = make_env(render_mode="rgb_array")
    image.reset(seed=0)
    frame = image.render()
    assert isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.shape[0] > 10 and frame.shape[1] > 10 and frame.std() > 0
