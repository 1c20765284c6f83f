"""Issue #13's machinery on tiny models: budget-relative actions (one policy, every target), the surrogate
data set built in shards, and the fidelity measurement on allocations a trained policy visits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import train
from prune_env.envs.layer import LayerPruneEnv
from prune_env.surrogate import load_surrogate, merge, read_dataset
from prune_env.surrogate.__main__ import main as surrogate_main
from prune_env.surrogate.commands import build as builder
from prune_env.surrogate.commands import scores as scorer
from prune_env.surrogate.commands import visited as visited_cmd
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_data(tiny_data: dict) -> dict:
    """The smoke config's data slices on the generated text and facts (what the smoke policy trains on)."""
    return {"text": tiny_data["text"], "facts": tiny_data["facts"], "calib_samples": 4, "calib_seq_len": 32,
            "grad_samples": 2, "eval_tokens": 256, "eval_seq_len": 64, "n_facts": 20}


def _surrogate_policy(tmp_path: Path, smoke_data: dict, rounds: int,
                      extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A tiny surrogate data set (`rounds` of the plan) and a smoke PPO policy trained on it over 0.3-0.6."""
    data_set = tmp_path / "tiny-surrogate.jsonl"
    builder.build("tiny-llama", data_set, rounds, 0, smoke_data, log=lambda m: None)
    run_dir = tmp_path / "run"
    overrides = [f"env.data.text={smoke_data['text']}", f"env.data.facts={smoke_data['facts']}", f"run_dir={run_dir}",
                 "env.fidelity=surrogate", f"env.surrogate={data_set}", "env.action_mode=budget",
                 "env.target_sparsity_range=[0.3, 0.6]", "eval.every_steps=0", "eval.final=false",
                 "checkpoint.every_steps=0", *extra]
    assert train.main(["--config", SMOKE, *overrides]) == 0
    return data_set, run_dir


@pytest.mark.parametrize("fidelity", ["exact", "proxy"])
def test_budget_actions_start_uniform_at_every_target_and_invert(tiny_data, fidelity):
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity=fidelity, action_mode="budget")
    numel = np.asarray([u.numel for u in env.units], dtype=float)
    for target in (0.3, 0.6):
        env.reset(options={"target_sparsity": target})
        done = False
        while not done:
            _, _, done, _, info = env.step(np.array([0.5], dtype=np.float32))
        assert np.allclose(info["allocation"], target, atol=1e-3)  # a = 0.5: uniform at this target
    wanted = np.linspace(0.2, 0.7, len(env.units))  # action_for_ratio asks for exactly these; the target
    env.reset(options={"target_sparsity": float(np.dot(wanted, numel) / numel.sum())})  # is their mean
    asked = []
    for ratio in wanted:
        _, _, _, _, info = env.step(env.action_for_ratio(float(ratio)))
        asked.append(info["ratio"])
    assert asked == pytest.approx(wanted.tolist(), abs=1e-3)
    check_env(env)


def test_budget_actions_need_continuous_actions(tiny_data):
    with pytest.raises(ValueError, match="action_mode=\"budget\" needs action_type=\"continuous\""):
        LayerPruneEnv(model="tiny-llama", data=tiny_data, action_type="discrete", action_mode="budget")
    with pytest.raises(ValueError, match="unknown action_mode 'relative'"):
        LayerPruneEnv(model="tiny-llama", data=tiny_data, action_mode="relative")


def test_shards_merge_into_the_unsharded_build(tmp_path, smoke_data):
    whole = tmp_path / "whole.jsonl"
    builder.build("tiny-llama", whole, 1, 0, smoke_data, log=lambda m: None)
    shards = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for index, path in enumerate(shards):
        builder.build("tiny-llama", path, 1, 0, smoke_data, log=lambda m: None, shard=(index, 3))
        assert {r["draw"] % 3 for r in read_dataset(path).records} == {index}
    merged = tmp_path / "merged.jsonl"
    assert merge(shards, merged) == 20
    expected, got = read_dataset(whole).records, read_dataset(merged).records
    assert [r["draw"] for r in got] == list(range(20))
    assert [(r["allocation"], r["ppl"], r["fact_acc"]) for r in got] == \
           [(r["allocation"], r["ppl"], r["fact_acc"]) for r in expected]
    with pytest.raises(FileExistsError):
        merge(shards, merged)
    other = tmp_path / "other.jsonl"
    builder.build("tiny-llama", other, 0, 5, smoke_data, log=lambda m: None)  # another plan seed
    with pytest.raises(ValueError, match="different plan"):
        merge([shards[0], other], tmp_path / "bad.jsonl")


def test_visited_fidelity_replays_policy_allocations_exactly_and_reanchors(tmp_path, smoke_data):
    data_set, run_dir = _surrogate_policy(tmp_path, smoke_data, rounds=2)
    env = LayerPruneEnv(model="tiny-llama", data=smoke_data, fidelity="exact")
    surrogate = load_surrogate(str(data_set), env.context)  # the fit before re-anchoring
    out = tmp_path / "visited.json"
    records_before = len(read_dataset(data_set).records)
    assert surrogate_main(["visited", "--policy", str(run_dir), "--targets", "0.4", "0.6", "--episodes", "2",
                          "--out", str(out), "--append", str(data_set)]) == 0
    report = json.loads(out.read_text())
    visited = report["visited"]
    assert [(v["target"], v["mode"]) for v in visited] == [(t, m) for t in (0.4, 0.6)
                                                          for m in ("mean", "sampled", "sampled")]
    assert visited[1]["allocation"] != visited[0]["allocation"]  # sampled actions visit other allocations
    for entry in visited:
        assert np.dot(entry["exact_allocation"], [u.numel for u in env.units]) / env.context.total_numel == \
            pytest.approx(entry["target"], abs=1e-3)
        env.reset(options={"target_sparsity": entry["target"]})
        for ratio in entry["allocation"]:
            *_, info = env.step(env.action_for_ratio(ratio))
        assert info["quality"] == pytest.approx(entry["quality"], rel=1e-9)  # exact replays are deterministic
    assert -1.0 <= report["figures"]["spearman"] <= 1.0
    assert report["figures"]["bias"] == pytest.approx(np.mean([v["predicted"] - v["quality"] for v in visited]))
    data = read_dataset(data_set)
    added = data.records[records_before:]
    assert len(added) == len(visited) and {r["kind"] for r in added} == {"visited"}
    assert min(r["draw"] for r in added) >= visited_cmd.VISITED_DRAWS
    refit = load_surrogate(str(data_set), env.context)  # the re-anchored fit reads the new records
    assert refit.predict(visited[0]["exact_allocation"]) != surrogate.predict(visited[0]["exact_allocation"])


def test_one_line_depth_rules_are_budget_matched_and_shaped(tiny_data):
    from agents.base import build_agent
    from prune_env.context import DataConfig, PruningContext

    ctx = PruningContext("tiny-llama-5", data=DataConfig.from_dict(tiny_data))
    numel = np.asarray([u.numel for u in ctx.units], dtype=float)
    for target in (0.3, 0.6):
        ramp = np.asarray(build_agent({"name": "ramp", "spread": 0.1}).allocate(ctx, target))
        first = np.asarray(build_agent({"name": "protect-first", "blocks": 2, "keep": 0.25}).allocate(ctx, target))
        for ratios in (ramp, first):
            assert np.dot(ratios, numel) / numel.sum() == pytest.approx(target, abs=1e-9)
        assert np.all(np.diff(ramp) > 0) and ramp[-1] - ramp[0] == pytest.approx(0.2, abs=0.02)
        assert first[:2] == pytest.approx([0.25 * target] * 2) and np.all(first[2:] > target)
    with pytest.raises(ValueError, match="leave at least one unprotected"):
        build_agent({"name": "protect-first", "blocks": 5}).allocate(ctx, 0.5)
    with pytest.raises(ValueError, match="ramp spread"):
        build_agent({"name": "ramp", "spread": 0.7})


def test_replay_agent_returns_the_recorded_allocation_and_refuses_what_is_missing(tmp_path, tiny_data):
    from agents.base import build_agent
    from prune_env.context import DataConfig, PruningContext

    ctx = PruningContext("tiny-llama-5", data=DataConfig.from_dict(tiny_data))
    chosen = [0.1, 0.3, 0.5, 0.7, 0.9]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"records": [
        {"agent": "ppo-s0", "seed": 0, "target_sparsity": 0.5, "status": "ok", "allocation": chosen},
        {"agent": "ppo-s0", "seed": 0, "target_sparsity": 0.6, "status": "failed", "allocation": None}]}))
    agent = build_agent({"name": "replay", "results": str(results), "agent": "ppo-s0"})
    assert agent.allocate(ctx, 0.5, seed=0) == chosen
    with pytest.raises(ValueError, match="no 'ppo-s0' cell at target 0.6"):
        agent.allocate(ctx, 0.6, seed=0)  # failed cells are not replayed
    with pytest.raises(ValueError, match="has no finished cell of agent 'owl'"):
        build_agent({"name": "replay", "results": str(results), "agent": "owl"})
    small = PruningContext("tiny-llama", data=DataConfig.from_dict(tiny_data))
    with pytest.raises(ValueError, match="same model and granularity"):
        agent.allocate(small, 0.5, seed=0)


def test_eval_at_start_puts_the_untrained_policy_first_on_the_curve(tmp_path, smoke_data):
    run_dir = tmp_path / "run"
    overrides = [f"env.data.text={smoke_data['text']}", f"env.data.facts={smoke_data['facts']}", f"run_dir={run_dir}",
                 "env.action_mode=budget", "eval.at_start=true", "eval.every_steps=30", "checkpoint.every_steps=0"]
    assert train.main(["--config", SMOKE, *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 30, 60]
    # budget actions: the untrained policy's mean action is ~0, i.e. close to uniform pruning at the target
    assert np.allclose(rows[0]["allocation"], 0.5, atol=0.1)
    plot = load_script("plot_training")
    assert plot.main([str(run_dir), str(run_dir), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_pessimism_lowers_the_reward_by_the_fits_spread_which_grows_off_the_data(tmp_path, smoke_data):
    data_set = tmp_path / "tiny.jsonl"
    builder.build("tiny-llama", data_set, 3, 0, smoke_data, log=lambda m: None)
    rewards, stds = {}, {}
    for k in (0.0, 2.0):
        env = LayerPruneEnv(model="tiny-llama", data=smoke_data, fidelity="surrogate", surrogate=str(data_set),
                            surrogate_pessimism=k)
        env.reset(options={"target_sparsity": 0.5})
        done = False
        while not done:
            _, reward, done, _, info = env.step(env.action_for_ratio(0.5))
        rewards[k], stds[k] = reward, info["surrogate_std"]
    assert stds[0.0] == stds[2.0] > 0
    assert rewards[2.0] == pytest.approx(rewards[0.0] - 2.0 * stds[0.0])
    surrogate = load_surrogate(str(data_set), env.context)
    records = read_dataset(data_set).records
    inside = surrogate.uncertainty([r["allocation"] for r in records])
    far = surrogate.uncertainty([[0.0, 0.0, 0.9], [0.9, 0.9, 0.0]])  # corners nobody measured
    for key in ("log_ppl_ratio", "fact_acc"):
        assert np.median(inside[key]) < far[key].min()
    with pytest.raises(ValueError, match="surrogate_pessimism"):
        LayerPruneEnv(model="tiny-llama", data=smoke_data, fidelity="surrogate", surrogate=str(data_set),
                      surrogate_pessimism=-1.0)


def test_a_surrogate_trained_policy_plays_on_data_its_surrogate_was_not_fitted_on(tmp_path, smoke_data):
    from agents.base import build_agent
    from agents.rl import load_policy, read_run_config
    from prune_env.context import DataConfig, PruningContext
    from prune_env.envs.factory import make_env

    data_set, run_dir = _surrogate_policy(tmp_path, smoke_data, rounds=1)
    same = PruningContext("tiny-llama", data=DataConfig.from_dict(smoke_data))
    agent = build_agent({"name": "rl", "path": str(run_dir)})
    played = agent.allocate(same, 0.5, seed=0)
    env = make_env(**{**read_run_config(run_dir).env_kwargs(), "target_sparsity_range": None}, context=same)
    assert played == load_policy(run_dir, env).rollout(env, seed=0, target=0.5)["allocation"]  # as on its surrogate
    other = PruningContext("tiny-llama", data=DataConfig.from_dict({**smoke_data, "seed": 3}))
    with pytest.raises(ValueError, match="was built for"):
        make_env(**{**read_run_config(run_dir).env_kwargs(), "target_sparsity_range": None}, context=other)
    ratios = build_agent({"name": "rl", "path": str(run_dir)}).allocate(other, 0.6, seed=0)
    numel = np.asarray([u.numel for u in other.units], dtype=float)
    assert np.dot(ratios, numel) / numel.sum() == pytest.approx(0.6, abs=1e-3)


def test_a_profile_blind_policy_allocates_the_same_whatever_the_calibration(tmp_path, smoke_data):
    """env.observe_profile=false travels with the saved run: the benchmark's rl agent plays blind too, so text
    that changes the dense profile does not change the policy's decisions."""
    from agents.base import build_agent
    from prune_env.context import DataConfig, PruningContext

    _, run_dir = _surrogate_policy(tmp_path, smoke_data, rounds=1, extra=("env.observe_profile=false",))
    contexts = [PruningContext("tiny-llama", data=DataConfig.from_dict({**smoke_data, "seed": seed}))
                for seed in (0, 3)]
    assert not np.allclose(contexts[0].z_wanda, contexts[1].z_wanda)  # another calibration, another profile
    for target in (0.3, 0.6):
        blind = [build_agent({"name": "rl", "path": str(run_dir)}).allocate(ctx, target, seed=0) for ctx in contexts]
        assert blind[0] == blind[1]
        seeing = [build_agent({"name": "rl", "path": str(run_dir), "env": {"observe_profile": True}})
                  .allocate(ctx, target, seed=0) for ctx in contexts]
        assert seeing[0] != seeing[1]  # the same weights reading the two profiles decide differently


def test_surrogate_scores_put_policies_and_rules_on_the_training_reward(tmp_path, smoke_data):
    """scripts/surrogate_scores.py: a policy's mean allocation and a rule's, scored by the policy's surrogate."""
    data_set, run_dir = _surrogate_policy(tmp_path, smoke_data, rounds=1)
    n_units = len(LayerPruneEnv(model="tiny-llama", data=smoke_data, fidelity="proxy").units)
    rules = {"uniform": {t: [t] * n_units for t in (0.3, 0.6)}}
    rows = scorer.scores([str(run_dir)], rules, targets=(0.3, 0.6), pessimism=3.0)
    assert [(r["target"], r["player"]) for r in rows] == [(t, p) for t in (0.3, 0.6) for p in (str(run_dir), "uniform")]
    visited, _ = visited_cmd.rollouts(str(run_dir), (0.3, 0.6), 0, 0)
    assert [r["predicted"] for r in rows if r["player"] == str(run_dir)] == \
        pytest.approx([v["predicted"] for v in visited])  # the same rollout the fidelity check replays
    assert all(r["lower_bound"] < r["predicted"] for r in rows)  # 3 spreads below
    plain = scorer.scores([str(run_dir)], rules, targets=(0.3,), pessimism=0.0)
    assert [r["lower_bound"] for r in plain] == [r["predicted"] for r in plain]
    assert "| 0.3 | uniform |" in scorer.table(rows)


def test_surrogate_scores_read_rules_from_a_grid_and_name_a_missing_agent():
    grid = ROOT / "docs" / "results" / "learned-smollm2" / "results.json"
    rules = scorer.rule_allocations(grid, ["uniform"])
    assert sorted(rules["uniform"]) == [0.3, 0.4, 0.5, 0.6]
    assert rules["uniform"][0.5] == pytest.approx([0.5] * 30, abs=1e-3)
    with pytest.raises(ValueError, match="'nobody'"):
        scorer.rule_allocations(grid, ["nobody"])


def test_visited_plays_a_preference_policy_at_each_w_and_compares_each_metric(tmp_path, smoke_data, capsys):
    """Re-anchoring a preference policy: each target at every asked w, the w kept on the appended record,
    and the fit's log-perplexity error where the policy went (what said the answer fit was optimistic)."""
    data_set, run_dir = _surrogate_policy(tmp_path, smoke_data, rounds=2,
                                          extra=("env.preference_range=[0.0, 1.0]",
                                                 "env.reward.knowledge_metric=fact_answer_ppl_balanced"))
    out = tmp_path / "visited.json"
    records_before = len(read_dataset(data_set).records)
    assert surrogate_main(["visited", "--policy", str(run_dir), "--targets", "0.5", "--episodes", "0",
                           "--preferences", "0", "1", "--out", str(out), "--append", str(data_set)]) == 0
    visited = json.loads(out.read_text())["visited"]
    assert [(v["target"], v["mode"], v["preference"]) for v in visited] == [(0.5, "mean", 0.0), (0.5, "mean", 1.0)]
    errors = json.loads(out.read_text())["figures"]["log_metrics"]["ppl"]
    expected = np.mean([np.log(v["predicted_metrics"]["ppl"]) - np.log(v["ppl"]) for v in visited])
    assert errors["bias"] == pytest.approx(expected) and errors["bias_per_target"]["0.5"] == pytest.approx(expected)
    added = read_dataset(data_set).records[records_before:]
    assert [r["params"]["preference"] for r in added] == [0.0, 1.0]
    plain = tmp_path / "plain"
    plain.mkdir()
    _, plain_run = _surrogate_policy(plain, smoke_data, rounds=2)
    assert surrogate_main(["visited", "--policy", str(plain_run), "--targets", "0.5", "--preferences", "0"]) == 2
    assert "trained without a preference_range: drop --preferences" in capsys.readouterr().err
