"""Heuristic agents on tiny-llama: exact budget and agreement with a hand computation of each rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import heuristics
from agents.rules import match_budget
from agents.alphapruning import hill_alpha
from agents.base import AGENTS, Agent, build_agent, check_allocation, play_allocation
from agents.heuristics import (
    AlphaPruningAgent,
    OWLAgent,
    RandomAgent,
    UniformAgent,
    ZScoreGreedyAgent,
)
from agents.llm import ChatBackend
from prune_env.context import PruningContext

@pytest.fixture(scope="module")
def setup(text_file):
    """Contexts on tiny-llama with the generated text of conftest.py (its autouse fixture isolates the cache)."""
    data = dict(text=str(text_file), calib_samples=4, calib_seq_len=32, eval_tokens=128, eval_seq_len=64,
                n_facts=8, grad_samples=2)
    block = PruningContext("tiny-llama", granularity="block", data=data)
    linear = PruningContext("tiny-llama", granularity="linear", data=data)
    return {"block": block, "linear": linear, "data": data}


def weighted(ctx, ratios) -> float:
    return sum(u.numel * r for u, r in zip(ctx.units, ratios)) / sum(u.numel for u in ctx.units)


AGENT_FACTORIES = [UniformAgent, OWLAgent, AlphaPruningAgent, RandomAgent, ZScoreGreedyAgent]


@pytest.mark.parametrize("granularity", ["block", "linear"])
@pytest.mark.parametrize("factory", AGENT_FACTORIES, ids=lambda f: f.__name__)
def test_every_agent_meets_the_budget_exactly(setup, factory, granularity):
    ctx = setup[granularity]
    agent = factory()
    assert isinstance(agent, Agent)
    for target in (0.3, 0.5, 0.7):
        ratios = agent.allocate(ctx, target, seed=1)
        assert len(ratios) == len(ctx.units)
        assert all(0.0 <= r < 1.0 for r in ratios)
        assert weighted(ctx, ratios) == pytest.approx(target, abs=1e-9)
        check_allocation(ctx, ratios, target)


def test_uniform(setup):
    assert UniformAgent().allocate(setup["block"], 0.4, 0) == [0.4] * 3


def hand_lod(ctx, m):
    """Per block: the share of |W| * ||X||_2 scores (dense weights, all linears of the block) above m x mean."""
    out = {}
    for b in sorted({ref.block_index for ref in ctx.refs}):
        scores = torch.cat([(ctx.masked.dense[ref.name].abs() * ctx.stats.act_norm[ref.name][None, :]).flatten()
                            for ref in ctx.refs if ref.block_index == b]).double()
        out[b] = float((scores > m * scores.mean()).double().mean())
    return out


def test_owl_matches_the_paper_formula(setup):
    ctx, target, lam, m = setup["block"], 0.5, 0.08, 5.0
    lod = np.array(list(hand_lod(ctx, m).values()))
    assert lod.max() > lod.min(), "the tiny model's blocks should differ in outlier ratio"
    r = (lod - lod.min()) / (lod.max() - lod.min()) * 2 * lam
    expected = 1.0 - (r - r.mean() + (1 - target))  # equal-sized blocks: no budget shift needed
    got = OWLAgent(lam=lam, m=m).allocate(ctx, target, 0)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert int(np.argmin(got)) == int(np.argmax(lod))  # most outliers -> least pruned


def test_owl_linear_units_share_their_block_ratio(setup):
    block, linear = setup["block"], setup["linear"]
    per_block = OWLAgent().allocate(block, 0.5, 0)
    per_linear = OWLAgent().allocate(linear, 0.5, 0)
    assert per_linear == [per_block[unit.linears[0].block_index] for unit in linear.units]


def hand_alphapruning(alphas, numel, target, eps):
    a = np.asarray(alphas)
    base = (a - a.min()) / (a.max() - a.min()) * 2 * eps + (1 - eps)
    n = np.asarray(numel, dtype=float)
    return base * (n.sum() * target / (n * base).sum())


def test_alphapruning_matches_the_reference_mapping(setup):
    heuristics._ALPHA_MEMORY.clear()
    eps, target = 0.3, 0.5
    for granularity in ("linear", "block"):
        ctx = setup[granularity]
        alphas = {ref.name: hill_alpha(ctx.masked.dense[ref.name]) for ref in ctx.refs}
        unit_alpha = [np.mean([alphas[ref.name] for ref in unit.linears]) for unit in ctx.units]
        expected = hand_alphapruning(unit_alpha, [u.numel for u in ctx.units], target, eps)
        got = AlphaPruningAgent(eps=eps).allocate(ctx, target, 0)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_alphapruning_caches_alphas(setup, monkeypatch):
    from prune_env.pruning.scoring import cache_dir

    ctx = setup["linear"]
    heuristics._ALPHA_MEMORY.clear()
    first = AlphaPruningAgent().allocate(ctx, 0.5, 0)
    assert list(cache_dir().glob("alphas-*.json"))

    def no_svd(*args, **kwargs):
        raise AssertionError("hill_alpha must not run again: the alphas are cached")

    monkeypatch.setattr(heuristics, "hill_alpha", no_svd)
    assert AlphaPruningAgent().allocate(ctx, 0.5, 0) == first  # memory
    heuristics._ALPHA_MEMORY.clear()
    assert AlphaPruningAgent().allocate(ctx, 0.5, 0) == first  # disk


def test_random_is_seeded_dirichlet(setup):
    ctx, target = setup["block"], 0.3
    for seed in (0, 3):
        rng = np.random.default_rng(np.random.SeedSequence([0, seed]))
        expected = rng.dirichlet(np.ones(3)) * 3 * target  # <= 0.9: no clipping, equal blocks: no shift
        np.testing.assert_allclose(RandomAgent().allocate(ctx, target, seed), expected, atol=1e-12)
    assert RandomAgent().allocate(ctx, target, 0) != RandomAgent().allocate(ctx, target, 1)
    assert RandomAgent(seed=5).allocate(ctx, target, 0) != RandomAgent().allocate(ctx, target, 0)


def test_zscore_greedy_matches_formula(setup):
    for granularity in ("block", "linear"):
        ctx = setup[granularity]
        imp = np.asarray(ctx.z_wanda) + np.asarray(ctx.z_grad)
        raw = 0.5 - 0.1 * imp / np.abs(imp).max()
        expected = match_budget(raw, [u.numel for u in ctx.units], 0.5)
        got = ZScoreGreedyAgent(spread=0.1).allocate(ctx, 0.5, 0)
        np.testing.assert_allclose(got, expected, atol=1e-12)
        if granularity == "block":  # z-scores have mean 0 and blocks are equal: no shift at all
            np.testing.assert_allclose(got, raw, atol=1e-12)
        assert int(np.argmin(got)) == int(np.argmax(imp))


def test_build_agent_registry():
    agent = build_agent({"name": "owl", "lam": 0.05, "m": 7})
    assert isinstance(agent, OWLAgent) and (agent.lam, agent.m, agent.name) == (0.05, 7.0, "owl")
    assert build_agent({"name": "random", "label": "rnd"}).name == "rnd"
    assert build_agent({"name": "rl", "path": "runs/x/policy.zip"}).name == "rl:policy"
    with pytest.raises(ValueError, match=r"unknown agent 'owll'.*alphapruning.*zscore-greedy"):
        build_agent({"name": "owll"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lamda'\].*valid parameters are \['label', 'lam', 'm'\]"):
        build_agent({"name": "owl", "lamda": 0.1})
    with pytest.raises(ValueError, match="no 'name'"):
        build_agent({"lam": 0.1})
    with pytest.raises(ValueError, match="lam"):
        build_agent({"name": "owl", "lam": -1})
    with pytest.raises(ValueError, match="path"):
        build_agent({"name": "rl"})
    with pytest.raises(ValueError, match="mode"):
        build_agent({"name": "llm", "mode": "chat"})
    assert set(AGENTS) >= {"uniform", "owl", "alphapruning", "random", "zscore-greedy", "llm", "rl"}


def test_check_allocation_rejects_bad_allocations(setup):
    ctx = setup["block"]
    with pytest.raises(ValueError, match="2 ratios but the model has 3 units"):
        check_allocation(ctx, [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="not the target"):
        check_allocation(ctx, [0.5, 0.5, 0.6], 0.5)
    with pytest.raises(ValueError, match="outside"):
        check_allocation(ctx, [1.0, 0.25, 0.25], 0.5)


def test_play_through_layerprune(setup):
    import gymnasium as gym

    import prune_env  # noqa: F401

    env = gym.make("prune_env/LayerPrune-v0", model="tiny-llama", data=setup["data"], fidelity="proxy",
                   proxy_eval_tokens=64, proxy_facts=4)
    ctx = env.unwrapped.context
    allocation = OWLAgent().allocate(ctx, 0.5, 0)
    info = play_allocation(env, allocation, target=0.5, seed=0)
    assert info["achieved_sparsity"] == pytest.approx(0.5, abs=len(ctx.units) / ctx.total_numel)
    np.testing.assert_allclose(info["allocation"], allocation, atol=1e-3)
    assert np.isfinite(info["ppl"])
    env.close()


# --------------------------------------------------------------------------- LLM / RL adapters


class AllUnitsBackend(ChatBackend):
    """A chat backend that always names every unit (JSON mode of the LLM agent)."""

    name = "scripted-llm"

    def __init__(self, units):
        super().__init__()
        self.units = units
        self.calls = 0

    def complete(self, messages, *, schema_hint=None):
        import json

        self.calls += 1
        return json.dumps({"units": self.units, "rationale": "spread evenly"})


def test_llm_adapter_plays_iterative_prune(setup, monkeypatch, tmp_path):
    from agents.llm import LLMAgent

    ctx = setup["block"]
    backend = AllUnitsBackend([u.name for u in ctx.units])
    agent = build_agent({"name": "llm", "mode": "iterative", "agent": {"max_units_per_step": 3},
                         "env": {"increment": 0.1, "rollback_threshold": 10.0}})
    assert isinstance(agent, LLMAgent)
    monkeypatch.setattr(agent, "_backend", lambda: backend)
    agent.configure(env_data=setup["data"], workdir=tmp_path)
    ratios = agent.allocate(ctx, 0.3, seed=3)
    check_allocation(ctx, ratios, 0.3, who="llm")
    assert ratios == pytest.approx([0.3, 0.3, 0.3], abs=1e-3)  # every unit, +0.1 per step
    info = agent.last_info
    # 3 steps of +0.1, plus possibly one more for the few weights per-matrix rounding left short
    assert info["llm_model"] == "scripted-llm" and info["iterations"] == backend.calls in (3, 4)
    assert info["rollbacks"] == 0 and info["llm"]["mode"] == "iterative"
    assert (tmp_path / "transcripts" / "llm-t0.3-s3.jsonl").exists()


def test_llm_adapter_oneshot(setup, monkeypatch):
    ctx = setup["linear"]

    class RatiosBackend(ChatBackend):
        name = "ratios-llm"

        def complete(self, messages, *, schema_hint=None):
            import json

            return json.dumps({"ratios": {u.name: 0.4 + 0.01 * (i % 3) for i, u in enumerate(ctx.units)},
                               "rationale": "x"})

    agent = build_agent({"name": "llm", "mode": "oneshot"})
    monkeypatch.setattr(agent, "_backend", lambda: RatiosBackend())
    ratios = agent.allocate(ctx, 0.5, seed=0)
    check_allocation(ctx, ratios, 0.5, who="llm")
    assert agent.last_info["iterations"] == 1 and agent.last_info["llm_model"] == "ratios-llm"


def test_rl_adapter_plays_layerprune(setup, tmp_path):
    pytest.importorskip("agents.rl")
    import gymnasium as gym
    import yaml
    from stable_baselines3 import PPO

    import prune_env  # noqa: F401

    env_cfg = {"model": "tiny-llama", "granularity": "block", "fidelity": "proxy", "proxy_eval_tokens": 64,
               "proxy_facts": 4, "data": setup["data"]}
    run = tmp_path / "ppo-run"
    run.mkdir()
    env = gym.make("prune_env/LayerPrune-v0", **env_cfg)
    PPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu").save(run / "final_model.zip")
    env.close()
    (run / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": "ppo"}, "env": env_cfg}))
    agent = build_agent({"name": "rl", "path": str(run), "label": "ppo"})
    agent.configure(env_data=setup["data"])
    ctx = setup["block"]
    first = {}
    for target in (0.3, 0.5):
        ratios = agent.allocate(ctx, target, seed=2)
        check_allocation(ctx, ratios, target, who="rl")
        first[target] = ratios
    assert agent.allocate(ctx, 0.5, seed=2) == first[0.5]  # deterministic policy
    assert agent.name == "ppo" and agent.last_info["rl"]["algo"] == "ppo"
    assert agent.last_info["rl"]["fidelity"] == "proxy"
