"""Surrogate fidelity where a policy goes: roll a trained policy out on the surrogate, replay exactly.

    python -m prune_env.surrogate visited --policy runs/ppo-surrogate-0 [--episodes 4] [--out fidelity.json]
    python -m prune_env.surrogate visited --policy runs/ppo-surrogate-0 --append prune_env/surrogate/data/...jsonl
    python -m prune_env.surrogate visited --calibration prune_env/surrogate/data/smollm2-135m-wanda-block.jsonl

A surrogate is only as good as its agreement on the allocations the policy actually visits (random
draws are not where a policy spends its time). For every target, the policy plays one episode with its
mean actions and `--episodes` with sampled actions (what PPO visits in training) on its surrogate env;
each allocation is then played again through LayerPrune-v0 with fidelity="exact" on the same model and
data, and the surrogate's predicted reward (its mean, whatever `surrogate_pessimism` the policy trained
with) is compared with the exact one: Spearman rank correlation
(overall and per target) and bias (mean predicted - exact). `--append` adds the exact records to a
surrogate data set (kind "visited"), which is the re-anchoring step: the next fit knows the region the
policy went to. Exact episodes dominate the cost (about 20 s each on 2 CPU cores for SmolLM2-135M). A
command module: it imports agents (trained policies), which prune_env's library modules never do.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..dataset import FLAGS, MATCH_KEYS, VISITED_DRAWS, append_record, read_dataset
from ..fit import fit, quality_of, reward_spread
from ..serve import load_surrogate
from .build import METRICS

TARGETS = (0.3, 0.4, 0.5, 0.6)


def rollouts(policy_path: str, targets, episodes: int, seed: int,
             preferences: tuple[float, ...] | None = None) -> tuple[list[dict], "object"]:
    """(allocation, target, mode, predicted metrics) of each rollout, and the surrogate env's context.
    `preferences`: for a policy trained with a preference_range, the w each target is played at (every
    episode of the target at each w); None: the env draws w from the episode's seed."""
    import torch

    from agents.rl import load_policy, read_run_config

    from ...envs.factory import make_env
    from ...envs.rewards import RewardConfig

    config = read_run_config(policy_path, [])
    if preferences is not None and config.env.preference_range is None:
        raise ValueError(f"{policy_path} was trained without a preference_range: drop --preferences")
    if config.env.fidelity != "surrogate":
        raise ValueError(f"{policy_path} was trained on fidelity={config.env.fidelity!r}: this script measures "
                         "the surrogate reward where a policy trained on it goes")
    env = make_env(**{**config.env_kwargs(), "target_sparsity_range": None})
    policy = load_policy(policy_path, env)
    surrogate = load_surrogate(config.env.surrogate, env.unwrapped.context)  # its mean, never the lower bound
    weights = asdict(RewardConfig.from_dict(config.env.reward))  # the form the data set header keeps (`reward`)
    torch.manual_seed(seed)  # sampled actions come from torch's generator
    visited = []
    for target in targets:
        for preference in (None,) if preferences is None else preferences:
            for episode in range(episodes + 1):
                deterministic = episode == 0
                result = policy.rollout(env, seed=seed + episode, target=target, deterministic=deterministic,
                                        preference=preference)
                metrics = surrogate.predict(result["allocation"])
                visited.append({"target": target, "mode": "mean" if deterministic else "sampled",
                                "preference": result.get("preference"), "allocation": result["allocation"],
                                "predicted": float(quality_of(metrics, surrogate.header["dense"], weights)),
                                "predicted_metrics": predicted_metrics(metrics, weights),
                                "training_reward": result["quality"]})
    return visited, env


def predicted_metrics(metrics, weights: dict) -> dict[str, float]:
    """The fit's perplexity and, when the reward has one the fit predicts, its knowledge metric."""
    knowledge = weights.get("knowledge_metric")
    values = {"ppl": float(metrics["ppl"])}
    if metrics.get(knowledge) is not None:  # dict.get: a metric the fit lacks is simply not compared
        values[knowledge] = float(metrics[knowledge])
    return values


def replay_exact(visited: list[dict], ctx, log=print) -> None:
    """Play each allocation exactly (adds the exact metrics to each entry)."""
    import gymnasium as gym

    from agents.base import play_allocation

    from .build import fact_flags

    env = gym.make("prune_env/LayerPrune-v0", fidelity="exact", context=ctx, min_sparsity=0.0, max_sparsity=0.9)
    exact = env.unwrapped.context  # model-backed even when `ctx` is a surrogate env's light context
    for count, entry in enumerate(visited, 1):
        start = time.perf_counter()
        info = play_allocation(env, entry["allocation"], target=entry["target"])
        entry.update({key: float(info[key]) for key in (*METRICS, "achieved_sparsity", "quality")})
        entry.update(fact_flags(exact))  # the model is left pruned at the episode's end
        entry["exact_allocation"], entry["seconds"] = list(info["allocation"]), time.perf_counter() - start
        log(f"[{count}/{len(visited)}] t={entry['target']} {entry['mode']}: predicted {entry['predicted']:.4f} "
            f"exact {entry['quality']:.4f} (ppl {entry['ppl']:.2f}, fact_acc {entry['fact_acc']:.3f}) "
            f"{entry['seconds']:.1f}s")
    env.close()


def agreement(visited: list[dict]) -> dict:
    """Spearman of predicted vs exact reward (overall, per target) and the bias of the prediction."""
    from scipy.stats import spearmanr

    predicted = np.asarray([v["predicted"] for v in visited])
    exact = np.asarray([v["quality"] for v in visited])
    per_target = {}
    for target in sorted({v["target"] for v in visited}):
        pick = np.asarray([v["target"] == target for v in visited])
        per_target[str(target)] = (float(spearmanr(predicted[pick], exact[pick]).statistic)
                                   if pick.sum() > 2 else None)
    return {"allocations": len(visited), "spearman": float(spearmanr(predicted, exact).statistic),
            "spearman_per_target": per_target, "bias": float(np.mean(predicted - exact)),
            "mae": float(np.mean(np.abs(predicted - exact))), "log_metrics": log_metric_errors(visited)}


def log_metric_errors(visited: list[dict]) -> dict[str, dict]:
    """Per predicted metric (perplexity, the answer perplexity...): the mean and per-target error of its log,
    predicted - exact (> 0: the fit promised a worse model than the exact one; < 0: a better one)."""
    names = sorted({name for v in visited for name in v.get("predicted_metrics", {})})
    errors = {}
    for name in names:
        pairs = [(v["target"], np.log(v["predicted_metrics"][name]) - np.log(v[name])) for v in visited
                 if name in v.get("predicted_metrics", {}) and v.get(name) is not None
                 and np.isfinite([v["predicted_metrics"][name], v[name]]).all()]  # an overflowed ppl says nothing
        per_target = {str(t): float(np.mean([e for tt, e in pairs if tt == t])) for t in sorted({t for t, _ in pairs})}
        errors[name] = {"bias": float(np.mean([e for _, e in pairs])), "bias_per_target": per_target}
    return errors


def append(visited: list[dict], path: Path, policy: str, ctx) -> int:
    """Add the exact replays to a surrogate data set built for the same model and data (re-anchoring)."""
    data = read_dataset(path)
    described = json.loads(json.dumps(ctx.describe()))
    for key in MATCH_KEYS:
        if data.header["context"].get(key) != described.get(key):
            raise ValueError(f"{str(path)!r} describes another {key} than the policy's env: not appended")
    # flags are only readable against the header's facts: the same slice of the same seeded permutation
    knows = "fact_set" in data.header and data.header.get("data_config") == asdict(ctx.data)
    draw = max([VISITED_DRAWS - 1, *(r["draw"] for r in data.records)]) + 1
    machine = f"{platform.machine()} {platform.node()} {ctx.device}"
    for offset, entry in enumerate(visited):
        params = {"policy": policy, **({"preference": entry["preference"]} if entry.get("preference") is not None
                                       else {})}
        append_record(path, {"draw": draw + offset, "target": entry["target"], "kind": "visited",
                             "variant": entry["mode"], "params": params,
                             "requested": entry["allocation"], "allocation": entry["exact_allocation"],
                             **{k: entry[k] for k in (*METRICS, "achieved_sparsity", "quality", "seconds")},
                             **({k: entry[k] for k in FLAGS} if knows else {}),
                             "machine": machine})
    return len(visited)


def spread_calibration(path: Path, multiples=(1.0, 2.0, 3.0)) -> dict:
    """How many of the fit's spreads it is off where policies went, out of sample: the `visited` records of
    each re-anchoring round (grouped by `params.policy`) are predicted by the fit on every other record.
    `surrogate_pessimism=k` pays prediction - k x spread, so `covered[k]` is the share of those errors the
    lower bound absorbs; positive z = the fit was optimistic."""
    data = read_dataset(path)
    rounds: dict[str, list[dict]] = {}
    for record in data.records:
        if record.get("kind") == "visited" and not record.get("perplexity_only"):  # a lent ppl has no reward
            rounds.setdefault(str(record.get("params", {}).get("policy")), []).append(record)
    if not rounds:
        raise ValueError(f"{str(path)!r} has no re-anchoring round to hold out (records of kind 'visited'): "
                         "add one with --policy P --append")
    weights = data.header["reward"]
    z, targets, per_round = [], [], {}
    for policy, held in rounds.items():
        keep = [r for r in data.records if r.get("kind") != "visited" or str(r["params"].get("policy")) != policy]
        metrics, spread = fit(data, records=keep).predict_with_spread([r["allocation"] for r in held])
        error = quality_of(metrics, data.header["dense"], weights) - np.asarray([r["quality"] for r in held])
        scaled = error / reward_spread(spread, weights)
        per_round[policy] = {"records": len(held), "bias": float(error.mean()), "mean_z": float(scaled.mean())}
        z += scaled.tolist()
        targets += [r["target"] for r in held]
    z_all, target_all = np.asarray(z), np.asarray(targets)
    return {"records": len(z), "mean_z": float(z_all.mean()), "median_z": float(np.median(z_all)),
            "mean_z_per_target": {str(t): float(z_all[target_all == t].mean()) for t in sorted(set(targets))},
            "covered": {str(k): float((z_all <= k).mean()) for k in multiples}, "rounds": per_round}
