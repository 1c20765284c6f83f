"""The front door: LayerPrune-v1 on the embedded SmolLM2-135M, played by three agents, in a few minutes.

    python scripts/demo.py [--target 0.5] [--out runs/demo-<time>]

Uniform Wanda (every block at the target), the zscore-greedy rule (the paper's profile) and the committed
PPO policy (trained on the surrogate reward for every target in 0.3-0.6, docs/results/ppo-surrogate) each
play one exact episode of the same environment (same model, operator, calibration and
reward slices). The env is the current id, LayerPrune-v1 (at block granularity its observations are
v0's, and the committed policy was trained on v1; playing v0 would make Gymnasium warn that it is out of
date). The script prints a table of perplexity, fact accuracy, fact retention and balanced retention and writes it
with each agent's allocation to `<out>/demo.json` and `<out>/demo.md`. These are the env's own reward slices
(4,096 handbook tokens, 200 facts), not the held-out evaluation of the benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym

import prune_env  # noqa: F401  (registers the environments)
from agents.base import build_agent, play_allocation
from prune_env.files import atomic_write_json, atomic_write_text, output_lock
from prune_env.envs.rewards import RewardConfig, quality

ENV_ID = "prune_env/LayerPrune-v1"
POLICY = "docs/results/ppo-surrogate/seed-0"
AGENTS = [{"name": "uniform"}, {"name": "zscore-greedy"}, {"name": "rl", "path": POLICY, "label": "PPO policy"}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", default=f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)

    with output_lock(args.out, "demo output folder") as out:
        print(f"loading {args.model} and its sensitivity profile ...", flush=True)
        env = gym.make(ENV_ID, model=args.model, target_sparsity=args.target, fidelity="exact")
        context = env.unwrapped.context
        dense = env.unwrapped.reference
        rows = [{"agent": "dense", "ppl": dense.ppl, "fact_acc": dense.fact_acc, "fact_retention": 1.0,
                 "fact_retention_balanced": 1.0, "achieved_sparsity": 0.0, "return": 0.0, "seconds": 0.0,
                 "allocation": None}]
        for config in AGENTS:
            agent = build_agent(config)
            agent.configure()
            start = time.perf_counter()
            allocation = agent.allocate(context, args.target, seed=0)
            info = play_allocation(env, allocation, target=args.target, seed=0)
            rows.append({"agent": agent.name, "ppl": info["ppl"], "fact_acc": info["fact_acc"],
                         "fact_retention": info["fact_retention"],
                         "fact_retention_balanced": info["fact_retention_balanced"],
                         "achieved_sparsity": info["achieved_sparsity"],
                         "return": quality(info["ppl"], info["fact_acc"], dense.ppl, dense.fact_acc, RewardConfig()), "seconds": time.perf_counter() - start,
                         "allocation": info["allocation"]})
            print(f"  {agent.name}: ppl {info['ppl']:.2f}, fact acc {info['fact_acc']:.3f}, "
                  f"retention {info['fact_retention']:.3f}, balanced {info['fact_retention_balanced']:.3f} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
        majority = context.knowledge_baseline.fact_retention_balanced
        env.close()

        lines = [f"{ENV_ID.split('/')[1]}, {args.model}, Wanda, block granularity, target {args.target:g}, exact fidelity "
                 f"({context.data.eval_tokens} handbook tokens, {context.data.n_facts} facts)", "",
                 f"| agent | ppl | fact acc | fact retention | balanced retention (majority baseline {majority:.3f}) "
                 "| achieved sparsity | reward (quality) |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['agent']} | {r['ppl']:.2f} | {r['fact_acc']:.3f} | {r['fact_retention']:.3f} | "
                  f"{r['fact_retention_balanced']:.3f} | {r['achieved_sparsity']:.4f} | {r['return']:.3f} |" for r in rows]
        table = "\n".join(lines) + "\n"
        atomic_write_json(Path(out) / "demo.json", {"model": args.model, "target_sparsity": args.target, "rows": rows})
        atomic_write_text(Path(out) / "demo.md", table)
    print("\n" + table)
    print(f"files: {out}/demo.md, {out}/demo.json (each agent's per-block allocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
