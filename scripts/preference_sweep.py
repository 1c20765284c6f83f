"""What a preference-conditioned policy does as w moves, on its own training surrogate (no model, seconds).

    python scripts/preference_sweep.py docs/results/ppo-preference/seed-0 docs/results/ppo-preference/seed-1 \
        docs/results/ppo-preference/seed-2 --targets 0.5 0.6 --preferences 0 0.5 1

Each policy plays one deterministic episode per (target, w) on the surrogate env it trained on, with the
surrogate's plain prediction (pessimism 0), and the table gives the predicted perplexity, balanced accuracy,
balanced retention and answer perplexity of the allocation ("-" where the policy's data set does not predict
it), plus the sparsity of the first and last unit. A policy that
ignores w prints the same row for every w; the benchmark (exact, held-out) says whether the moves are real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agents.rl import load_policy, read_run_config
from prune_env import make_env


def sweep(path: str, targets: list[float], preferences: list[float]) -> list[str]:
    config = read_run_config(path, [])
    if config.env.fidelity != "surrogate" or config.env.preference_range is None:
        raise SystemExit(f"error: {path} was not trained on the surrogate with a preference_range")
    env = make_env(**{**config.env_kwargs(), "surrogate_pessimism": 0.0})
    policy = load_policy(path, env)
    rows = []
    for target in targets:
        for w in preferences:
            end = policy.rollout(env, seed=0, target=target, preference=w)
            answer = end.get("fact_answer_ppl_balanced")
            rows.append(f"| {Path(path).name} | {target:g} | {w:g} | {end['ppl']:.2f} | {end['fact_acc_balanced']:.3f} | "
                        f"{end['fact_retention_balanced']:.3f} | {'-' if answer is None else f'{answer:.1f}'} | "
                        f"{end['allocation'][0]:.2f} | {end['allocation'][-1]:.2f} |")
    env.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="run folders of policies trained with preference_range")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--preferences", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    print("| policy | target | w | ppl | balanced accuracy | balanced retention | answer ppl | first unit | last unit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.policies:
        print("\n".join(sweep(path, args.targets, args.preferences)))


if __name__ == "__main__":
    main()
