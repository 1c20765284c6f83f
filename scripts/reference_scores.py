"""Regenerate the reference scores (prune_env/envs/reference_scores.json): every rule and the committed PPO
policies on LayerPrune-v1, SmolLM2-135M, Wanda, block granularity, default reward and data, targets 0.3-0.6.

    OMP_NUM_THREADS=1 python scripts/reference_scores.py                      # surrogate, then exact
    python scripts/reference_scores.py --fidelity surrogate                   # seconds
    python scripts/reference_scores.py --table-only                           # the table from the episodes

Each episode is appended to `--episodes` as it finishes (a rerun skips the ones already there), so a
killed run resumes. The PPO policies (docs/results/ppo-surrogate/seed-{0,1,2}, trained on the surrogate
with action_mode="budget") choose their allocation on the surrogate env (the same observations as the
proxy env the benchmark uses: dense profile, last_drop 0); every allocation is then played through
`agents.base.play_allocation` on the env of the task's fidelity. "ppo" in the table is the mean of the three seeds;
best known is the best of all rules and ppo at that target.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = (0.3, 0.4, 0.5, 0.6)
RULES = ("uniform", "owl", "alphapruning", "zscore-greedy", "ramp", "protect-first")
POLICIES = tuple(f"docs/results/ppo-surrogate/seed-{seed}" for seed in range(3))
FIDELITIES = ("surrogate", "exact")
MODEL, METHOD, GRANULARITY = "smollm2-135m", "wanda", "block"
EPISODES = ROOT / "docs/results/reference-scores/episodes.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fidelity", nargs="+", choices=FIDELITIES, default=list(FIDELITIES))
    parser.add_argument("--episodes", type=Path, default=EPISODES, help="one JSON line per episode (resumable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the table (default: prune_env/envs/reference_scores.json)")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from --episodes, play nothing")
    return parser.parse_args(argv)


def read_episodes(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def ppo_allocation(ctx, policy_dir: str, target: float, cache: dict) -> list[float]:
    """The policy's deterministic allocation, chosen on the surrogate env it was trained on."""
    from agents.rl import load_policy
    from prune_env.envs.factory import make_env

    if "env" not in cache:
        cache["env"] = make_env("prune_env/LayerPrune-v1", fidelity="surrogate", action_mode="budget", context=ctx)
    if policy_dir not in cache:
        cache[policy_dir] = load_policy(ROOT / policy_dir, cache["env"])
    return list(cache[policy_dir].rollout(cache["env"], seed=0, target=target)["allocation"])


def play_all(fidelities: list[str], episodes: Path) -> None:
    import gymnasium as gym

    from agents.base import build_agent, play_allocation
    from prune_env.context import PruningContext
    from prune_env.envs.reference import task_key
    from prune_env.surrogate import append_record

    done = {(e["task"], e["target"], e["agent"]) for e in read_episodes(episodes)}
    episodes.parent.mkdir(parents=True, exist_ok=True)
    episodes.touch()
    ctx = PruningContext(MODEL, method=METHOD, granularity=GRANULARITY)
    rules = {name: build_agent(name) for name in RULES}
    policies: dict = {}
    for fidelity in fidelities:
        task = task_key(MODEL, METHOD, GRANULARITY, fidelity)
        env = gym.make("prune_env/LayerPrune-v1", fidelity=fidelity, context=ctx)
        for target in TARGETS:
            for agent in [*RULES, *POLICIES]:
                if (task, target, agent) in done:
                    continue
                ctx.restore()  # allocations are made on the dense model (alphapruning reads the weights)
                started = time.time()
                allocation = (rules[agent].allocate(ctx, target, seed=0) if agent in rules
                              else ppo_allocation(ctx, agent, target, policies))
                info = play_allocation(env, allocation, target=target)
                record = {"task": task, "target": target, "agent": agent, "return": float(info["quality"]),
                          "ppl": float(info["ppl"]), "fact_acc": float(info["fact_acc"]),
                          "achieved_sparsity": float(info["achieved_sparsity"]),
                          "allocation": [round(float(r), 6) for r in info["allocation"]],
                          "seconds": round(time.time() - started, 2)}
                append_record(episodes, record)
                print(f"{task} {target} {agent}: {record['return']:.4f} ({record['seconds']} s)", flush=True)
        env.close()


def build_table(records: list[dict]) -> dict:
    """Per task and target: every agent's return, "ppo" (mean of the seeds), uniform, best rule, best known."""
    tasks: dict = {}
    for r in records:
        tasks.setdefault(r["task"], {}).setdefault(f"{r['target']:.1f}", {})[r["agent"]] = r["return"]
    table: dict = {}
    for task, by_target in sorted(tasks.items()):
        for target, returns in sorted(by_target.items()):
            if not set(RULES) | set(POLICIES) <= set(returns):
                continue  # an unfinished target stays out of the table
            named = {name: returns[name] for name in RULES}
            named["ppo"] = sum(returns[p] for p in POLICIES) / len(POLICIES)
            rule = max((n for n in RULES if n != "uniform"), key=named.get)
            best = max(named, key=named.get)
            table.setdefault(task, {})[target] = {
                "uniform": named["uniform"], "best_rule": {"name": rule, "return": named[rule]},
                "best_known": {"name": best, "return": named[best]},
                "returns": {**named, **{f"ppo-seed-{i}": returns[p] for i, p in enumerate(POLICIES)}}}
    return {"format": "prune-gym reference scores", "version": 1,
            "env": "prune_env/LayerPrune-v1 (block granularity: identical to v0), RewardConfig() and DataConfig() "
                   "defaults; return = final quality",
            "agents": {"rules": list(RULES), "ppo": "mean of " + ", ".join(POLICIES),
                       "best_rule": "the best rule other than uniform", "best_known": "the best of rules and ppo"},
            "command": "OMP_NUM_THREADS=1 python scripts/reference_scores.py", "tasks": table}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from prune_env.envs import reference
    from prune_env.files import atomic_write_json

    if not args.table_only:
        play_all(args.fidelity, args.episodes)
    out = args.out or reference.TABLE
    atomic_write_json(out, build_table(read_episodes(args.episodes)))
    reference.load_table.cache_clear()
    print(reference.markdown(str(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
