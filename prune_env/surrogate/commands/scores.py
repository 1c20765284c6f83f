"""Do trained policies beat a rule on their OWN training reward? Score both on the surrogate.

    python -m prune_env.surrogate scores --policy docs/results/ppo-surrogate/seed-{0,1,2} \
        --results docs/results/learned-smollm2/results.json --agents uniform protect-first ramp

Each policy plays its mean actions once per target on its surrogate env; each named agent's allocation is
taken from a benchmark's results.json (what it chose at that target). All are scored with the first
policy's surrogate: its prediction and the lower bound the policies were paid (prediction - pessimism x
spread). A policy below a rule here lost on the reward it optimised: an optimisation failure, which no
amount of reward fidelity fixes. A policy above a rule here but below it on held-out data lost to the
reward's fidelity. Costs seconds (no exact episode). A command module: it imports agents (trained policies).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..fit import quality_of, reward_spread
from ..serve import load_surrogate
from .visited import rollouts

TARGETS = (0.3, 0.4, 0.5, 0.6)


def rule_allocations(results_path: Path, agents: list[str]) -> dict[str, dict[float, list[float]]]:
    """{agent: {target: allocation}} of seed 0's finished cells in a benchmark results.json."""
    from prune_bench.store import load_results

    records = load_results(results_path)["records"]
    chosen: dict[str, dict[float, list[float]]] = {}
    for name in agents:
        cells = {r["target_sparsity"]: r["allocation"] for r in records
                 if r["agent"] == name and r["status"] == "ok" and r["seed"] == 0}
        if not cells:
            raise ValueError(f"{str(results_path)!r} has no finished cell of agent {name!r}")
        chosen[name] = cells
    return chosen


def scores(policies: list[str], rules: dict[str, dict[float, list[float]]], targets=TARGETS,
           pessimism: float | None = None) -> list[dict]:
    """One row per (target, player): the surrogate's predicted reward and its lower bound."""
    from agents.rl import read_run_config

    from ...envs.rewards import RewardConfig

    played: dict[str, dict[float, list[float]]] = {}
    surrogate = weights = None
    for path in policies:
        visited, env = rollouts(path, targets, 0, 0)
        played[path] = {v["target"]: v["allocation"] for v in visited}
        if surrogate is None:
            config = read_run_config(path, [])
            surrogate = load_surrogate(config.env.surrogate, env.unwrapped.context)
            weights = asdict(RewardConfig.from_dict(config.env.reward))  # the data set header's form (`reward`)
            pessimism = float(config.env.surrogate_pessimism) if pessimism is None else float(pessimism)
        env.close()
    rows = []
    for target in targets:
        for name, allocations in {**played, **rules}.items():
            if target not in allocations:
                continue
            metrics, spread = surrogate.predict_with_spread([allocations[target]])
            predicted = float(quality_of(metrics, surrogate.header["dense"], weights)[0])
            width = reward_spread(spread, weights)[0]
            rows.append({"target": target, "player": name, "predicted": predicted,
                         "lower_bound": predicted - pessimism * float(width), "pessimism": pessimism})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| target | player | predicted reward | lower bound (the training reward) |", "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['player']} | {r['predicted']:.3f} | {r['lower_bound']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"
