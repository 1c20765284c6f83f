"""The search agent (CMA-ES / random search) on tiny-llama: budget, episode cap, best >= uniform, seeds, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.base import Agent, build_agent, check_allocation, play_allocation
from agents.search import SearchAgent, SearchConfig, search_allocation
from prune_env.context import PruningContext
from prune_env.envs.layer import LayerPruneEnv
from prune_env.envs.factory import make_env

OPTIMIZERS = ("cmaes", "random")


@pytest.fixture(scope="module")
def contexts(text_file):
    """Block (3 units) and linear (21 units) contexts of tiny-llama on conftest's generated text."""
    data = dict(text=str(text_file), calib_samples=4, calib_seq_len=32, eval_tokens=128, eval_seq_len=64,
                n_facts=8, grad_samples=2)
    return {"block": PruningContext("tiny-llama", granularity="block", data=data),
            "linear": PruningContext("tiny-llama", granularity="linear", data=data)}


@pytest.fixture
def episode_counter(monkeypatch):
    """Counts LayerPrune resets and steps (every env episode starts with one reset)."""
    counts = {"resets": 0, "steps": 0}
    reset, step = LayerPruneEnv.reset, LayerPruneEnv.step

    def counting_reset(self, **kwargs):
        counts["resets"] += 1
        return reset(self, **kwargs)

    def counting_step(self, action):
        counts["steps"] += 1
        return step(self, action)

    monkeypatch.setattr(LayerPruneEnv, "reset", counting_reset)
    monkeypatch.setattr(LayerPruneEnv, "step", counting_step)
    return counts


# --------------------------------------------------------------------------- the agent on a real env


@pytest.mark.parametrize("granularity", ["block", "linear"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_allocations_meet_the_target(contexts, optimizer, granularity):
    ctx = contexts[granularity]
    agent = SearchAgent(optimizer=optimizer, episodes=4)
    assert isinstance(agent, Agent) and not agent.deterministic
    for target in (0.3, 0.6):
        ratios = agent.allocate(ctx, target, seed=0)
        assert len(ratios) == len(ctx.units)
        check_allocation(ctx, ratios, target, who="search")
        assert agent.last_info["search"]["episodes"] == 4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("episodes", [1, 5, 10])
def test_exactly_the_budget_of_episodes_is_played(contexts, episode_counter, optimizer, episodes):
    """CMA-ES samples 7 candidates a generation on 3 units: 5 and 10 episodes cut a generation short."""
    ctx = contexts["block"]
    agent = SearchAgent(optimizer=optimizer, episodes=episodes)
    agent.allocate(ctx, 0.5, seed=3)
    assert episode_counter["resets"] == episodes
    assert episode_counter["steps"] == episodes * len(ctx.units)  # whole episodes only
    assert agent.last_info["search"]["episodes"] == episodes


def test_proxy_fidelity_counts_the_same(contexts, episode_counter):
    agent = SearchAgent(optimizer="cmaes", episodes=6, fidelity="proxy")
    check_allocation(contexts["block"], agent.allocate(contexts["block"], 0.5, seed=0), 0.5)
    assert episode_counter["resets"] == 6 and agent.last_info["search"]["fidelity"] == "proxy"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_best_is_at_least_uniform_and_replays_to_its_quality(contexts, optimizer):
    ctx = contexts["linear"]
    agent = SearchAgent(optimizer=optimizer, episodes=8, sigma0=0.2)
    ratios = agent.allocate(ctx, 0.5, seed=1)
    info = agent.last_info["search"]
    assert info["optimizer"] == optimizer and info["best_quality"] >= info["uniform_quality"]
    env = make_env(rescale=False, context=ctx, target_sparsity=0.5)
    try:
        assert play_allocation(env, [0.5] * len(ctx.units))["quality"] == info["uniform_quality"]
        assert play_allocation(env, ratios)["quality"] == info["best_quality"]
    finally:
        env.close()


def test_same_seed_same_allocation(contexts):
    ctx = contexts["block"]
    agent = SearchAgent(optimizer="cmaes", episodes=9, sigma0=0.2)
    first = agent.allocate(ctx, 0.5, seed=7)
    first_info = dict(agent.last_info)
    assert SearchAgent(optimizer="cmaes", episodes=9, sigma0=0.2).allocate(ctx, 0.5, seed=7) == first
    assert agent.allocate(ctx, 0.5, seed=7) == first and agent.last_info == first_info


def test_the_lent_context_comes_back_dense(contexts):
    ctx = contexts["block"]
    SearchAgent(optimizer="random", episodes=3).allocate(ctx, 0.7, seed=0)
    assert ctx.unit_sparsity() == [0.0] * len(ctx.units)
    for ref in ctx.refs:
        module = dict(ctx.model.named_modules())[ref.name]
        assert torch.equal(module.weight.detach(), ctx.masked.dense[ref.name])


# --------------------------------------------------------------------------- the search loop on a known objective


def quadratic(numel: list[int], optimum: list[float], calls: list[list[float]]):
    """quality = -parameter-weighted squared distance to `optimum`; records every candidate it is asked."""
    weights = np.asarray(numel, dtype=np.float64) / sum(numel)

    def evaluate(allocation: list[float]) -> tuple[float, list[float]]:
        calls.append(list(allocation))
        return -float(weights @ (np.asarray(allocation) - optimum) ** 2), list(allocation)

    return evaluate


NUMEL = [100, 200, 300, 400, 500]
OPTIMUM = [0.30, 0.40, 0.45, 0.55, 0.60]  # parameter-weighted mean 0.5


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_search_improves_on_uniform_and_every_candidate_meets_the_target(optimizer):
    calls: list[list[float]] = []
    config = SearchConfig(optimizer=optimizer, episodes=60, sigma0=0.1)
    result = search_allocation(quadratic(NUMEL, OPTIMUM, calls), NUMEL, 0.5, 0.0, 0.9, config, seed=0)
    assert len(calls) == 60 == result.episodes and calls[0] == [0.5] * 5
    for candidate in calls:
        assert all(0.0 <= r <= 0.9 for r in candidate)
        assert np.dot(NUMEL, candidate) / sum(NUMEL) == pytest.approx(0.5, abs=1e-9)
    assert result.quality > result.uniform_quality
    assert result.quality == max(result.qualities) and result.allocation == calls[result.best_episode]


def test_cmaes_climbs_and_beats_random_search_on_a_smooth_objective():
    results = {optimizer: search_allocation(quadratic(NUMEL, OPTIMUM, []), NUMEL, 0.5, 0.0, 0.9,
                                            SearchConfig(optimizer=optimizer, episodes=120, sigma0=0.1), seed=0)
               for optimizer in OPTIMIZERS}
    assert results["cmaes"].quality > results["random"].quality
    population = 8  # CMA-ES's default on 5 units: 4 + int(3 ln 5)
    qualities = results["cmaes"].qualities
    assert np.mean(qualities[-population:]) > np.mean(qualities[1:1 + population])  # last generation > first


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_seeds_drive_the_candidates(optimizer):
    config = SearchConfig(optimizer=optimizer, episodes=12)
    runs = {}
    for seed in (0, 0, 1):
        calls: list[list[float]] = []
        search_allocation(quadratic(NUMEL, OPTIMUM, calls), NUMEL, 0.5, 0.0, 0.9, config, seed=seed)
        runs.setdefault(seed, []).append(calls)
    assert runs[0][0] == runs[0][1]
    assert runs[0][0][1:] != runs[1][0][1:]


def test_ties_go_to_the_earliest_and_non_finite_qualities_rank_last():
    config = SearchConfig(optimizer="cmaes", episodes=9)
    flat = search_allocation(lambda a: (-1.0, list(a)), NUMEL, 0.5, 0.0, 0.9, config, seed=0)
    assert flat.best_episode == 0 and flat.allocation == [0.5] * 5

    def broken_uniform(allocation):
        return (math.nan if allocation == [0.5] * 5 else -2.0), list(allocation)

    result = search_allocation(broken_uniform, NUMEL, 0.5, 0.0, 0.9, config, seed=0)
    assert result.best_episode == 1 and result.quality == -2.0 and math.isnan(result.uniform_quality)


# --------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize("key, value", [("episodes", 0), ("episodes", 2.5), ("optimizer", "foo"), ("sigma0", -1),
                                        ("sigma0", 0), ("fidelity", "x"), ("env", [1])])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        SearchAgent(**{key: value})
    with pytest.raises(ValueError, match=key):
        build_agent({"name": "search", key: value})


def test_env_options_the_agent_sets_itself_are_refused():
    for key in ("context", "target_sparsity", "fidelity", "model"):
        with pytest.raises(ValueError, match=f"env=.*{key}"):
            SearchAgent(env={key: None})


def test_bad_env_option_fails_on_first_use(contexts):
    agent = build_agent({"name": "search", "episodes": 2, "env": {"max_sparsity": 1.5}})
    with pytest.raises(ValueError, match="max_sparsity"):
        agent.allocate(contexts["block"], 0.5, seed=0)


def test_env_bounds_are_the_search_bounds(contexts):
    ctx = contexts["block"]
    agent = build_agent({"name": "search", "optimizer": "random", "episodes": 6, "sigma0": 0.5, "label": "s",
                         "env": {"min_sparsity": 0.4, "max_sparsity": 0.6}})
    assert agent.name == "s"
    ratios = agent.allocate(ctx, 0.5, seed=0)
    check_allocation(ctx, ratios, 0.5)
    assert all(0.4 - 1e-3 <= r <= 0.6 + 1e-3 for r in ratios)


def test_a_benchmark_cell(tmp_path, text_file):
    from prune_bench.bench_config import BenchmarkConfig, defaults
    from prune_bench.driver import run_benchmark
    from prune_bench.store import validate_results
    from prune_env.config_files import merge

    old_threads = torch.get_num_threads()
    base = {"model": "tiny-llama", "device": "cpu", "threads": 1, "targets": [0.5], "seeds": [0],
            "agents": [{"name": "search", "optimizer": "cmaes", "episodes": 3}],
            "data": {"text": str(text_file), "calib_samples": 4, "calib_seq_len": 32, "eval_tokens": 256,
                     "eval_seq_len": 64, "n_facts": 20, "grad_samples": 2},
            "heldout": {"eval_tokens": 256, "eval_seq_len": 64, "n_facts": 20}, "out": str(tmp_path / "bench")}
    try:
        data = run_benchmark(BenchmarkConfig.from_dict(merge(defaults(), base)))
    finally:
        torch.set_num_threads(old_threads)
    validate_results(data)
    (record,) = data["records"]
    assert (record["agent"], record["status"], record["error"]) == ("search", "ok", None)
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3) and record["ppl"] > 1
    assert record["agent_config"]["episodes"] == 3
    assert record["search"]["episodes"] == 3 and record["search"]["best_quality"] >= record["search"]["uniform_quality"]
    check_allocation(PruningContext("tiny-llama", data=base["data"]), record["allocation"], 0.5)
