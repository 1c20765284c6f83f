"""Do trained policies beat a rule on their OWN training reward? Score both on the surrogate.

    python scripts/surrogate_scores.py --policy docs/results/ppo-surrogate/seed-{0,1,2} \
        --results docs/results/learned-smollm2/results.json --agents uniform protect-first ramp

Each policy plays its mean actions once per target on its surrogate env; each named agent's allocation is
taken from a benchmark's results.json (what it chose at that target). All are scored with the first
policy's surrogate: its prediction and the lower bound the policies were paid (prediction - pessimism x
spread). A policy below a rule here lost on the reward it optimised: an optimisation failure, which no
amount of reward fidelity fixes. A policy above a rule here but below it on held-out data lost to the
reward's fidelity. Costs seconds (no exact episode).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # visited_fidelity's rollouts

from visited_fidelity import rollouts  # noqa: E402

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
    from prune_env.rewards import RewardConfig
    from prune_env.surrogate import load_surrogate, quality_of, reward_spread

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", nargs="+", required=True, help="run folders trained on fidelity=surrogate")
    parser.add_argument("--results", type=Path, required=True, help="a benchmark results.json with the rules' cells")
    parser.add_argument("--agents", nargs="+", default=["uniform", "protect-first"])
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--pessimism", type=float, default=None, help="default: the first policy's")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every row")
    args = parser.parse_args(argv)
    try:
        rows = scores(args.policy, rule_allocations(args.results, args.agents), args.targets, args.pessimism)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.out is not None:
        from prune_env.files import atomic_write_json

        atomic_write_json(args.out, {"policies": args.policy, "results": str(args.results), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
