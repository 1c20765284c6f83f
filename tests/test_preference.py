"""Preference conditioning (issue #26 item 3): the knowledge objective, w in the observation and in info, the
preference's scalarisation of the reward, and the agents that pass w on (rl, llm prompts).

Runs on tiny-llama with facts the tiny model itself answers greedy-exact (`known_facts`), so its balanced
retention is defined and moves when it is pruned; numbers from a random model mean nothing beyond the tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import prune_env  # noqa: F401  (registers the environments)
import train
from agents.llm.options import AgentOptions
from agents.llm.prompts import allocation_messages, system_prompt
from agents.rl import RLAgent, rollout_policy
from conftest import generated_text
from prune_env.config_files import ConfigError, dataclass_from_dict
from prune_env.context import PruningContext
from prune_env.envs.rewards import RewardConfig, knowledge_objective
from training.train_config import resolve_config

ENV_ID = "prune_env/LayerPrune-v0"
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
PREFERENCE = 9  # observation index of w at block granularity (9 + k, k = 0 kinds)
DISTRACTORS = ["is", "the", "pa", "of", "and", "to"]


@pytest.fixture(scope="module")
def known_data(tiny_data, tmp_path_factory) -> dict:
    """tiny_data with facts tiny-llama answers greedy-exact: prompts from generated text whose greedy next
    token is one whole word, kept only if the project's own fact scoring agrees (two relations)."""
    from prune_env.data.evaluation import evaluate_facts
    from prune_env.data.facts import Fact
    from prune_env.models import load_model

    model, tokenizer = load_model("tiny-llama")
    sentences = [s.strip() for s in generated_text(40, seed=1).replace("!", ".").replace("?", ".").split(".")]
    candidates, seen = [], set()
    for sentence in filter(None, sentences):
        words = sentence.split()
        for k in range(2, len(words)):
            prompt = " ".join(words[:k])
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            with torch.no_grad():
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            piece = tokenizer.decode([token])
            if prompt in seen or not (piece.startswith(" ") and piece[1:].isalpha()):
                continue
            seen.add(prompt)
            answer = piece[1:]
            choices = [answer, *[d for d in DISTRACTORS if d != answer][:3]]
            candidates.append(Fact(prompt, answer, choices, relation=f"r{len(candidates) % 2}"))
        if len(candidates) >= 24:
            break
    known = [f for f, ok in zip(candidates, evaluate_facts(model, tokenizer, candidates).greedy_exact) if ok]
    assert len(known) >= 8, f"only {len(known)} facts known by tiny-llama"
    path = tmp_path_factory.mktemp("known") / "known.jsonl"
    path.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer, "choices": f.choices,
                                        "relation": f.relation}) + "\n" for f in known), encoding="utf-8")
    return {**tiny_data, "facts": str(path), "n_facts": len(known)}


@pytest.fixture(scope="module")
def make_env(known_data):
    """gym.make on tiny-llama with the known facts; one env per set of arguments (each owns its model)."""
    made: dict = {}

    def make(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in made:
            kwargs.setdefault("proxy_eval_tokens", 128)
            made[key] = gym.make(ENV_ID, model="tiny-llama", data=known_data, **kwargs)
        return made[key]

    yield make
    for env in made.values():
        env.close()


def play(env, ratios, seed=0, options=None):
    """One episode asking for `ratios`: (observations, rewards, infos)."""
    obs, info = env.reset(seed=seed, options=options)
    observations, rewards, infos = [obs], [], [info]
    for ratio in ratios:
        obs, reward, _, _, info = env.step(env.unwrapped.action_for_ratio(ratio))
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
    return observations, rewards, infos


SKEWED = [0.9, 0.6, 0.3]  # 3 tiny-llama blocks at target 0.6: enough damage to lose known facts


@pytest.mark.parametrize("granularity, index", [("block", PREFERENCE), ("linear", PREFERENCE + 5)])
def test_preference_is_observed_at_its_index_and_in_info(make_env, granularity, index):
    env = make_env(fidelity="proxy", granularity=granularity, preference_range=(0.2, 0.8), target_sparsity=0.6,
                   kind_encoding="role")
    plain = make_env(fidelity="proxy", granularity=granularity, target_sparsity=0.6, kind_encoding="role")
    assert env.observation_space.shape[0] == plain.observation_space.shape[0] + 1 == index + 1
    assert env.unwrapped._observer.preference_index == index
    obs, info = env.reset(seed=4)
    w = info["preference"]
    assert 0.2 <= w <= 0.8 and env.unwrapped.preference == w
    n = len(env.unwrapped.units)
    observations, _, infos = play(env, [0.6] * n, seed=4)
    assert all(o[index] == np.float32(w) for o in observations)
    assert all(i["preference"] == w for i in infos)
    assert env.observation_space.contains(observations[-1])
    others = [env.reset(seed=s)[1]["preference"] for s in range(8)]
    assert len(set(others)) > 1 and all(0.2 <= x <= 0.8 for x in others)


def test_reset_option_fixes_the_preference_and_seeds_repeat(make_env):
    env = make_env(fidelity="proxy", preference_range=(0.2, 0.8), target_sparsity_range=(0.3, 0.6))
    obs, info = env.reset(seed=1, options={"preference": 0.95})  # any w in [0, 1], also outside the range
    assert info["preference"] == 0.95 and obs[PREFERENCE] == np.float32(0.95)
    first = env.reset(seed=7)
    again = env.reset(seed=7)
    assert first[1] == again[1] and np.array_equal(first[0], again[0])
    # the target draw comes first: an env without preference draws the same target for the same seed
    plain = make_env(fidelity="proxy", target_sparsity_range=(0.3, 0.6))
    assert plain.reset(seed=7)[1] == {"target_sparsity": first[1]["target_sparsity"]}
    with pytest.raises(ValueError, match=r"preference=1.5 is not|preference=1.5"):
        env.reset(options={"preference": 1.5})
    with pytest.raises(ValueError, match="needs an env built with preference_range"):
        plain.reset(options={"preference": 0.5})
    for bad, message in (((0.8, 0.2), "lo <= hi"), ((0.2, 1.2), "preference_range"), ("0.5", "pair")):
        with pytest.raises(ValueError, match=message):
            gym.make(ENV_ID, model="tiny-llama", preference_range=bad)


def test_reward_is_the_preference_scalarisation(make_env):
    """w = 0: the ppl objective; w = 1: the knowledge objective; between: their convex combination."""
    env = make_env(fidelity="exact", preference_range=(0.0, 1.0), target_sparsity=0.6)
    dense = env.unwrapped.reference
    assert dense.retention_by_relation  # the tiny model knows these facts
    ends = {}
    for w in (0.0, 0.3, 1.0):
        _, rewards, infos = play(env, SKEWED, options={"preference": w})
        end = infos[-1]
        ppl = -math.log(end["ppl"] / dense.ppl)
        knowledge = end["fact_retention_balanced"] - 1.0
        ends[w] = (rewards[-1], ppl, knowledge)
        assert rewards[:-1] == [0.0, 0.0] and end["quality"] == rewards[-1] and end["normalised_score"] is None
    assert ends[0.0][0] == ends[0.0][1]
    assert ends[1.0][0] == ends[1.0][2]
    assert ends[0.3][0] == pytest.approx(0.7 * ends[0.3][1] + 0.3 * ends[0.3][2], abs=1e-12)
    assert ends[1.0][2] < 0.0 and ends[0.0][1] < 0.0  # the skewed allocation lost facts and perplexity
    vector = make_env(fidelity="exact", preference_range=(0.0, 1.0), target_sparsity=0.6, reward_mode="vector")
    assert vector.unwrapped.reward_config.names() == ["ppl", "facts", "knowledge"]
    assert vector.get_wrapper_attr("reward_space").shape == (3,)
    _, rewards, infos = play(vector, SKEWED, options={"preference": 0.3})
    assert rewards[-1][0] == ends[0.3][1] and rewards[-1][2] == ends[0.3][2]
    assert infos[-1]["quality"] == ends[0.3][0]


def test_preference_off_changes_nothing(make_env):
    """Without preference_range: the v0 observation (9 entries), no preference in info, the old reward."""
    off = make_env(fidelity="exact", target_sparsity=0.6)
    on = make_env(fidelity="exact", target_sparsity=0.6, preference_range=(0.5, 0.5))
    assert off.observation_space.shape == (9,) and off.unwrapped.reward_config.names() == ["ppl", "facts"]
    obs_off, rewards_off, infos_off = play(off, SKEWED, seed=3)
    obs_on, _, infos_on = play(on, SKEWED, seed=3)
    assert all("preference" not in info for info in infos_off)
    for a, b in zip(obs_off, obs_on):  # the same observation with w inserted at its index
        assert np.array_equal(a, np.delete(b, PREFERENCE))
    end, dense = infos_off[-1], off.unwrapped.reference
    assert rewards_off[-1] == -math.log(end["ppl"] / dense.ppl) - (dense.fact_acc - end["fact_acc"])
    metrics = ("quality", "normalised_score", "preference")  # what the preference changes: the paid quality
    assert {k: v for k, v in end.items() if k not in metrics} == \
        {k: v for k, v in infos_on[-1].items() if k not in metrics}


def test_knowledge_weight_adds_the_objective_only_when_asked(make_env):
    assert RewardConfig().names() == ["ppl", "facts"] and RewardConfig().weights().shape == (2,)
    config = RewardConfig.from_dict({"knowledge_weight": 0.5, "terms": {}})
    assert config.names() == ["ppl", "facts", "knowledge"] and list(config.weights()) == [1.0, 1.0, 0.5]
    env = make_env(fidelity="exact", target_sparsity=0.6, reward={"knowledge_weight": 0.5})
    _, rewards, infos = play(env, SKEWED)
    end, dense = infos[-1], env.unwrapped.reference
    base = -math.log(end["ppl"] / dense.ppl) - (dense.fact_acc - end["fact_acc"])
    assert rewards[-1] == pytest.approx(base + 0.5 * (end["fact_retention_balanced"] - 1.0), abs=1e-12)
    with pytest.raises(ValueError, match="knowledge_weight"):
        RewardConfig.from_dict({"knowledge_weight": float("nan")})
    with pytest.raises(ValueError, match="leave reward.ppl_weight"):
        make_env(fidelity="proxy", preference_range=(0.0, 1.0), reward={"ppl_weight": 2.0})


def test_unknown_knowledge_is_a_clear_error(make_env, tiny_data):
    env = make_env(fidelity="proxy", preference_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="fact_retention_balanced is NaN"):
        knowledge_objective({"fact_retention_balanced": float("nan")}, env.unwrapped)
    # the default tiny facts: the random model answers none, so retention could only read 0
    with pytest.raises(ValueError, match="answers none of this env's facts"):
        gym.make(ENV_ID, model="tiny-llama", data=tiny_data, fidelity="proxy", preference_range=(0.0, 1.0))
    # the answer perplexity scores every fact's right answer, answered or not: defined on the same facts
    env = gym.make(ENV_ID, model="tiny-llama", data=tiny_data, fidelity="proxy", preference_range=(0.0, 1.0),
                   reward={"knowledge_metric": "fact_answer_ppl_balanced"})
    assert knowledge_objective({"fact_answer_ppl_balanced": env.unwrapped.reference.fact_answer_ppl_balanced * math.e},
                               env.unwrapped, "fact_answer_ppl_balanced") == pytest.approx(-1.0)


def test_the_preference_recipe_builds_on_its_joined_data_set_and_refuses_the_packaged_one():
    """configs/ppo-preference.yaml plays model-free on its data set (knowledge records + the packaged
    perplexities). Without it: the packaged data set was built on other facts (refused by name), and on its own
    facts it has no balanced metric (refused, not read as 0)."""
    config = resolve_config(ROOT / "configs" / "ppo-preference.yaml")
    assert config.env.preference_range == [0.0, 1.0] and config.env.fidelity == "surrogate"
    kwargs = {k: v for k, v in config.env_kwargs().items() if k != "env_id"}
    env = gym.make(config.env.env_id, **kwargs)
    assert env.unwrapped.context.total_numel > 0 and not hasattr(env.unwrapped.context, "model")
    _, info = env.reset(seed=0, options={"preference": 0.25})
    terminated = False
    while not terminated:
        _, reward, terminated, _, end = env.step(np.ones(env.action_space.shape, dtype=np.float32) * 0.5)
    assert end["preference"] == 0.25 and 0.0 < end["fact_acc_balanced"] < 1.0 and np.isfinite(reward)
    # each objective is lowered by the pessimism times its own spread (the knowledge one in its units)
    dense, k = env.unwrapped.reference, env.unwrapped.surrogate_pessimism
    assert k > 0 and end["surrogate_knowledge_std"] > 0 and end["surrogate_std"] > 0
    ppl = -math.log(end["ppl"] / dense.ppl) - k * end["surrogate_std"]
    knowledge = end["fact_acc_balanced"] / dense.fact_acc_balanced - 1 - k * end["surrogate_knowledge_std"]
    assert reward == pytest.approx(0.75 * ppl + 0.25 * knowledge, abs=1e-9)
    env.close()
    packaged = {**kwargs, "surrogate": None}
    with pytest.raises(ValueError, match="surrogate data set 'the packaged one' was built for .*offline-balanced"):
        gym.make(config.env.env_id, **packaged)
    with pytest.raises(ValueError, match="fact_acc_balanced.*NaN"):
        gym.make(config.env.env_id, **{**packaged, "data": {}})


def test_the_knowledge_metric_is_chosen_and_checked(make_env):
    from prune_env.envs.rewards import KNOWLEDGE_METRICS

    env = make_env(fidelity="proxy", preference_range=(0.0, 1.0), reward={"knowledge_metric": "fact_acc_balanced"})
    dense = env.unwrapped.reference
    metrics = {"fact_acc_balanced": dense.fact_acc_balanced / 2, "fact_retention_balanced": 0.0}
    assert knowledge_objective(metrics, env.unwrapped, "fact_acc_balanced") == pytest.approx(-0.5)
    assert knowledge_objective(metrics, env.unwrapped, KNOWLEDGE_METRICS[0]) == -1.0
    _, info = env.reset(seed=0, options={"preference": 1.0})
    terminated = False
    while not terminated:
        _, reward, terminated, _, end = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    assert reward == pytest.approx(end["fact_acc_balanced"] / dense.fact_acc_balanced - 1.0, abs=1e-9)
    # the answer perplexity's objective has the ppl objective's form: doubling it costs log 2 nats per token
    doubled = {"fact_answer_ppl_balanced": dense.fact_answer_ppl_balanced * 2}
    assert knowledge_objective(doubled, env.unwrapped, "fact_answer_ppl_balanced") == pytest.approx(-math.log(2))
    answer_env = make_env(fidelity="proxy", preference_range=(0.0, 1.0),
                          reward={"knowledge_metric": "fact_answer_ppl_balanced"})
    answer_env.reset(seed=0, options={"preference": 1.0})
    terminated = False
    while not terminated:
        _, reward, terminated, _, end = answer_env.step(np.zeros(answer_env.action_space.shape, dtype=np.float32))
    assert reward == pytest.approx(-math.log(end["fact_answer_ppl_balanced"] / dense.fact_answer_ppl_balanced))
    assert end["fact_answer_ppl_balanced"] > dense.fact_answer_ppl_balanced  # pruning loses answer likelihood
    with pytest.raises(ValueError, match="knowledge_metric='fact_acc' is not a knowledge metric: use one of "
                                         "fact_retention_balanced, fact_acc_balanced, "
                                         "fact_answer_ppl_balanced"):
        RewardConfig.from_dict({"knowledge_metric": "fact_acc"})


class WPolicy:
    """A synthetic policy: the action is 2 w - 1 (w read from the observation), recorded per step."""

    def __init__(self, space):
        self.observation_space, self.seen = space, []

    def predict(self, obs, deterministic=True):
        self.seen.append(float(obs[PREFERENCE]))
        return np.array([2.0 * obs[PREFERENCE] - 1.0], dtype=np.float32), None


def test_rollout_passes_the_preference_into_the_observation(known_data):
    from prune_env.envs.factory import make_env

    env = make_env(ENV_ID, model="tiny-llama", data=known_data, fidelity="proxy", proxy_eval_tokens=128,
                   preference_range=(0.0, 1.0))
    policy = WPolicy(env.observation_space)
    low = rollout_policy(policy, env, seed=0, target=0.5, preference=0.0)
    assert policy.seen == [0.0] * 3 and low["preference"] == 0.0
    high = rollout_policy(policy, env, seed=0, target=0.5, preference=1.0)
    assert policy.seen[3:] == [1.0] * 3 and high["preference"] == 1.0
    assert low["allocation"] != high["allocation"]
    env.close()


@pytest.fixture(scope="module")
def preference_run(known_data, tmp_path_factory) -> Path:
    """A few hundred PPO steps of configs/smoke.yaml with env.preference_range [0, 1] on the proxy fidelity."""
    run_dir = tmp_path_factory.mktemp("train") / "preference"
    args = ["--config", SMOKE, f"env.data.text={known_data['text']}", f"env.data.facts={known_data['facts']}",
            f"env.data.n_facts={known_data['n_facts']}", f"env.proxy_facts={known_data['n_facts']}",
            "env.preference_range=[0, 1]", "algo.total_timesteps=240", "eval.every_steps=0",
            "checkpoint.every_steps=0", "logging.wandb=disabled", "logging.tensorboard=false",
            "logging.progress_bar=false", f"run_dir={run_dir}"]
    assert train.main(args) == 0
    return run_dir


def test_rl_agent_plays_a_preference_policy_at_its_preference(preference_run, known_data):
    assert "preference_range" in (preference_run / "config.yaml").read_text()
    ctx = PruningContext("tiny-llama", data=known_data)
    for w in (0.0, 1.0):
        agent = RLAgent(str(preference_run), env={"fidelity": "proxy"}, preference=w)
        assert agent.name == f"rl:preference@w={w:g}"
        agent.allocate(ctx, 0.5, seed=0)  # loads the policy
        predict, observed = agent._policy.model.predict, []
        agent._policy.model.predict = lambda obs, **kw: (observed.append(float(obs[PREFERENCE])), predict(obs, **kw))[1]
        allocation = agent.allocate(ctx, 0.5, seed=0)
        assert observed == [w] * 3 and agent.last_info["rl"]["preference"] == w
        assert abs(ctx.weighted_sparsity(allocation) - 0.5) < 1e-3
    with pytest.raises(ValueError, match="give the agent a preference"):
        RLAgent(str(preference_run), env={"fidelity": "proxy"}).allocate(ctx, 0.5, seed=0)
    with pytest.raises(ValueError, match="preference"):
        RLAgent(str(preference_run), preference=1.5)


def test_llm_prompts_state_the_preference():
    plain = system_prompt(4, 0.05, 0.9)
    assert "Preference" not in plain and system_prompt(4, 0.05, 0.9, preference=None) == plain
    stated = system_prompt(4, 0.05, 0.9, preference=0.7)
    assert "weight 0.70 on keeping factual knowledge" in stated and "0.30 on perplexity" in stated
    assert stated.replace(stated[stated.index("Preference"):stated.index("Sensitivity")], "") == plain
    table = [{"unit": "block.0", "index": 0, "z_wanda": 0.0, "z_grad": 0.0, "sparsity": 0.0, "param_share": 1.0}]
    assert "Preference" not in allocation_messages(table, 0.5)[0]["content"]
    assert "weight 0.25 on keeping" in allocation_messages(table, 0.5, preference=0.25)[0]["content"]
    assert dataclass_from_dict(AgentOptions, {"preference": 0.7}, "llm agent").preference == 0.7
    with pytest.raises(ConfigError, match="preference"):
        dataclass_from_dict(AgentOptions, {"preference": 1.5}, "llm agent")


def test_surrogate_pessimism_lowers_only_the_ppl_objective():
    """With a preference the fidelity's spread is the log-ppl one alone and k * spread lowers the ppl part."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from prune_env.envs.rewards import preference_configs, preference_quality
    from prune_env.surrogate import reward_spread

    env_config, fidelity_config = preference_configs(RewardConfig(), (0.0, 1.0))
    assert env_config.names() == ["ppl", "facts", "knowledge"] and preference_configs(RewardConfig(), None)[1] == \
        RewardConfig()
    spread = {"log_ppl_ratio": np.array([0.2]), "fact_acc": np.array([0.5])}
    assert reward_spread(spread, asdict(fidelity_config))[0] == pytest.approx(0.2)
    env = SimpleNamespace(reference=SimpleNamespace(ppl=10.0, fact_retention_balanced=1.0,
                                                    retention_by_relation={"r": 1.0}))
    metrics = {"ppl": 10.0 * math.e, "fact_retention_balanced": 0.25}
    for w in (0.0, 0.4, 1.0):
        assert preference_quality(metrics, [], env, env_config, w, ppl_pessimism=0.3) == \
            pytest.approx((1 - w) * (-1.0 - 0.3) + w * (0.25 - 1.0))


def test_preference_sweep_plays_the_committed_policy_at_each_w_model_free():
    """scripts/preference_sweep.py on a committed preference policy: one row per (target, w), read from the
    surrogate without a model, and the policy's allocation moves with the observed w."""
    from script_modules import load_script

    sweep = load_script("preference_sweep").sweep
    rows = sweep(str(ROOT / "docs/results/ppo-preference/seed-0"), [0.6], [0.0, 1.0])
    cells = [row.strip("|").split("|") for row in rows]
    assert len(rows) == 2 and all(float(c[1]) == 0.6 and float(c[3]) > 24.0 for c in cells)
    assert [c[2].strip() for c in cells] == ["0", "1"] and rows[0].split("|")[4:] != rows[1].split("|")[4:]
    with pytest.raises(SystemExit, match="not trained on the surrogate with a preference_range"):
        sweep(str(ROOT / "docs/results/ppo-surrogate/seed-0"), [0.5], [0.0])
