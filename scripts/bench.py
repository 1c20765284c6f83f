"""`make bench`: cost of evaluation and episodes on the embedded model, side by side, plus proxy fidelity.

    python scripts/bench.py [--model smollm2-135m] [--allocations 30] [--repeats 3] [--out bench.json]

Prints and writes bench.json with the tracked figures:
  eval_throughput_ratio    project perplexity+facts tokens/s over a plain HF forward's, same batches (goal >= 0.8)
  profile_vs_wanda_ratio   profile (activation norms + gradient importance) seconds / one Wanda prune pass (goal <= 2)
  episode_vs_eval_ratio    one exact LayerPrune episode / one full evaluation of a pruned model, same slices (goal <= 1.3)
  proxy_episodes_per_s     proxy LayerPrune episodes per second
  peak_rss_ratio           peak resident memory / fp32 model size (goal <= 3)
  proxy_exact_spearman     rank correlation of proxy and exact episode quality over random allocations (goal >= 0.8)
  bf16_fp32_proxy_spearman rank correlation of the same proxy episodes in bfloat16 vs float32
  bf16_proxy_speedup       float32 proxy episode seconds / bfloat16 proxy episode seconds
  surrogate_episodes_per_s full LayerPrune-v0 episodes per second with fidelity="surrogate", 2 threads (goal >= 50)
  surrogate_exact_spearman rank correlation of surrogate and exact reward on data-set allocations the fit never saw
                           (5-fold by draw number; goal >= 0.9)
  surrogate_visited_spearman the same on allocations the committed surrogate-trained PPO policy visits (one
                           mean and one sampled episode per target 0.3-0.6, replayed exactly; goal >= 0.9)
  surrogate_visited_bias   mean predicted - exact reward there (optimism where the policy goes)
`--only surrogate` / `--only visited` / `--only memory` (peak_rss_ratio alone) measure just those figures and
update them in an existing --out file.
peak_rss_ratio is taken after the exact environment's set-up, the profile, a Wanda pass, one episode and
the full evaluations, before the plain-forward baseline (full logits) and the proxy and bf16 environments.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents.base import play_allocation
from agents.rules import random_ratios
from prune_env.pruning.calibration import TokenBatch
from prune_env.data.evaluation import evaluate_facts, fact_batches, perplexity
from prune_env.pruning.sequential import prune_model
from prune_env.pruning.scoring import compute_linear_stats


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@torch.no_grad()
def plain_forward_tokens_per_s(model, windows: torch.Tensor, facts, batch_size: int) -> tuple[float, int]:
    tokens, start = 0, time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i:i + batch_size], use_cache=False)
        tokens += windows[i:i + batch_size].numel()
    for batch in facts:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        tokens += int(batch.input_ids.numel())
    return tokens / (time.perf_counter() - start), tokens


def surrogate_figures(model: str, episodes: int) -> tuple[dict, dict]:
    """The surrogate's speed (whole episodes with random actions, targets 0.3-0.6) and held-out fidelity."""
    import gymnasium as gym

    import prune_env  # noqa: F401  (registers the environments)
    from prune_env.surrogate import PACKAGED, cross_validated, read_dataset

    torch.set_num_threads(2)
    fidelity = cross_validated(read_dataset(PACKAGED))
    env = gym.make("prune_env/LayerPrune-v0", model=model, fidelity="surrogate")
    env.action_space.seed(0)
    targets = (0.3, 0.4, 0.5, 0.6)

    def episode(i: int) -> float:
        env.reset(seed=i, options={"target_sparsity": targets[i % len(targets)]})
        done, reward = False, 0.0
        while not done:
            _, reward, done, _, _ = env.step(env.action_space.sample())
        return reward

    episode(0)  # warm-up: the surrogate is fitted at the first load
    _, seconds = timed(lambda: [episode(i) for i in range(episodes)])
    figures = {"surrogate_episodes_per_s": episodes / seconds, "surrogate_exact_spearman": fidelity["spearman"]}
    details = {"surrogate_episodes": episodes, "surrogate_threads": torch.get_num_threads(),
               "surrogate_cross_validated": {k: v for k, v in fidelity.items() if k not in ("exact", "predicted")}}
    return figures, details


POLICY = "docs/results/ppo-surrogate/seed-0"  # the committed surrogate-trained policy (configs/ppo-surrogate.yaml)


def visited_figures(policy: str, episodes: int) -> tuple[dict, dict]:
    """Surrogate vs exact reward on allocations the policy visits (python -m prune_env.surrogate visited)."""
    from prune_env.surrogate.commands import visited as visited_fidelity

    visited, env = visited_fidelity.rollouts(policy, visited_fidelity.TARGETS, episodes, seed=0)
    visited_fidelity.replay_exact(visited, env.unwrapped.context, log=lambda m: print(m, flush=True))
    figures = visited_fidelity.agreement(visited)
    return ({"surrogate_visited_spearman": figures["spearman"], "surrogate_visited_bias": figures["bias"]},
            {"surrogate_visited": {"policy": policy, **figures}})


GOALS = {"eval_throughput_ratio": (">=", 0.8), "profile_vs_wanda_ratio": ("<=", 2.0),
         "episode_vs_eval_ratio": ("<=", 1.3), "peak_rss_ratio": ("<=", 3.0), "proxy_exact_spearman": (">=", 0.8),
         "surrogate_episodes_per_s": (">=", 50.0), "surrogate_exact_spearman": (">=", 0.9),
         "surrogate_visited_spearman": (">=", 0.9)}


def report(figures: dict) -> None:
    for key, value in figures.items():
        goal = GOALS.get(key)
        verdict = ""
        if goal and math.isnan(value):
            verdict = "not measured in this run"
        elif goal:
            met = value >= goal[1] if goal[0] == ">=" else value <= goal[1]
            verdict = f"goal {goal[0]} {goal[1]}: {'met' if met else 'MISSED'}"
        print(f"{key:26s} {value:10.3f}  {verdict}")


def update(out: str, figures: dict, details: dict) -> int:
    """Report `figures` and merge them (and `details`) into an existing --out file (`--only`)."""
    path = Path(out)
    previous = json.loads(path.read_text()) if path.exists() else {"details": {}}
    report(figures)
    previous.update(figures)
    previous["details"].update(details)
    path.write_text(json.dumps(previous, indent=2))
    print(f"updated {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--allocations", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--repeats", type=int, default=3, help="episode/evaluation timings to take the median of")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 ranking check")
    parser.add_argument("--only", choices=("all", "surrogate", "visited", "memory"), default="all",
                        help="surrogate / visited / memory: measure only those figures, updating them in --out")
    parser.add_argument("--surrogate-episodes", type=int, default=500)
    parser.add_argument("--policy", default=POLICY, help="surrogate-trained policy for the visited figures")
    parser.add_argument("--visited-episodes", type=int, default=1, help="sampled episodes per target (+1 mean)")
    args = parser.parse_args()
    if args.only in ("surrogate", "visited"):
        figures, details = (surrogate_figures(args.model, args.surrogate_episodes) if args.only == "surrogate"
                            else visited_figures(args.policy, args.visited_episodes))
        return update(args.out, figures, details)
    import gymnasium as gym

    import prune_env  # noqa: F401  (registers the environments)

    exact = gym.make("prune_env/LayerPrune-v0", model=args.model, target_sparsity=args.target).unwrapped
    ctx = exact.context
    model, data = ctx.model, ctx.data
    n_params = sum(p.numel() for p in model.parameters())

    # 2. profile (activation norms + gradient importance) vs one plain Wanda prune pass
    grad = [TokenBatch(ctx.slices.calibration[:data.grad_samples])]
    _, profile_s = timed(lambda: compute_linear_stats(model, ctx.refs, ctx.calibration, grad, None))
    ctx.restore()
    _, wanda_s = timed(lambda: prune_model(model, ctx.slices.calibration, {r.name: 0.5 for r in ctx.refs}, "wanda",
                                           None, data.batch_size, ctx.masked))

    # 3. one exact episode vs one full evaluation of the pruned model on the same slices (medians of
    # --repeats alternating runs: single timings on a shared 2-core machine vary by 10-15 %)
    uniform = [args.target] * len(ctx.units)
    episode_times, eval_times = [], []
    for _ in range(args.repeats):
        episode_times.append(timed(lambda: play_allocation(exact, uniform, seed=0))[1])
        eval_times.append(timed(ctx.evaluate)[1])
    episode_s, full_eval_s = float(np.median(episode_times)), float(np.median(eval_times))
    _, eval_s = timed(lambda: (perplexity(model, ctx.slices.evaluation, data.batch_size),
                               evaluate_facts(model, ctx.tokenizer, ctx.facts, data.fact_batch_size)))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # one exact env in the process
    if args.only == "memory":
        return update(args.out, {"peak_rss_ratio": peak_rss / (n_params * 4)},
                      {"peak_rss_bytes": peak_rss, "model": args.model, "threads": torch.get_num_threads()})

    # 1. evaluation throughput: the project's perplexity + facts (just above) vs a plain HF forward on the
    # same batches. Measured after peak_rss: the plain forward forms full logits, which the project never does.
    batches = fact_batches(ctx.tokenizer, ctx.facts, data.fact_batch_size)
    plain_tps, tokens = plain_forward_tokens_per_s(model, ctx.slices.evaluation, batches, data.batch_size)
    project_tps = tokens / eval_s

    # 4./6. proxy episodes per second, and proxy/exact agreement over random allocations
    proxy = gym.make("prune_env/LayerPrune-v0", model=args.model, target_sparsity=args.target,
                     fidelity="proxy").unwrapped
    numel = [u.numel for u in ctx.units]
    exact_q, proxy_q, proxy_times = [], [], []
    for i in range(args.allocations):
        ratios = random_ratios(numel, args.target, np.random.default_rng(i), low=0.0, high=0.9)
        info, seconds = timed(lambda: play_allocation(proxy, ratios, seed=0))
        proxy_q.append(info["quality"])
        proxy_times.append(seconds)
        exact_q.append(play_allocation(exact, ratios, seed=0)["quality"])
        print(f"allocation {i + 1}/{args.allocations}: exact {exact_q[-1]:.4f} proxy {proxy_q[-1]:.4f}", flush=True)
    from scipy.stats import spearmanr

    rho = float(spearmanr(exact_q, proxy_q).statistic) if args.allocations > 2 else float("nan")

    # 7. bf16: does the cheaper dtype keep the ranking of allocations? (same proxy episodes, bf16 model copy)
    bf16_q, bf16_times = [], []
    if args.bf16:
        proxy.close()
        bf16 = gym.make("prune_env/LayerPrune-v0", model=args.model, target_sparsity=args.target,
                        fidelity="proxy", dtype="bfloat16").unwrapped
        for i in range(args.allocations):
            ratios = random_ratios(numel, args.target, np.random.default_rng(i), low=0.0, high=0.9)
            info, seconds = timed(lambda: play_allocation(bf16, ratios, seed=0))
            bf16_q.append(info["quality"])
            bf16_times.append(seconds)
    rho_bf16 = float(spearmanr(proxy_q, bf16_q).statistic) if len(bf16_q) > 2 else float("nan")

    figures = {
        "eval_throughput_ratio": project_tps / plain_tps,
        "profile_vs_wanda_ratio": profile_s / wanda_s,
        "episode_vs_eval_ratio": episode_s / full_eval_s,
        "proxy_episodes_per_s": 1.0 / float(np.mean(proxy_times)) if proxy_times else float("nan"),
        "peak_rss_ratio": peak_rss / (n_params * 4),
        "proxy_exact_spearman": rho,
        "bf16_fp32_proxy_spearman": rho_bf16,
        "bf16_proxy_speedup": float(np.mean(proxy_times) / np.mean(bf16_times)) if bf16_times else float("nan"),
    }
    details = {
        "model": args.model, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "plain_forward_tokens_per_s": plain_tps, "project_eval_tokens_per_s": project_tps, "eval_tokens": tokens,
        "profile_s": profile_s, "wanda_prune_s": wanda_s, "exact_episode_s": episode_s, "full_eval_s": full_eval_s,
        "exact_episode_runs_s": episode_times, "full_eval_runs_s": eval_times,
        "proxy_episode_s": float(np.mean(proxy_times)) if proxy_times else None, "peak_rss_bytes": peak_rss,
        "exact_quality": exact_q, "proxy_quality": proxy_q, "bf16_proxy_quality": bf16_q, "data": ctx.describe(),
    }
    surrogate, surrogate_details = surrogate_figures(args.model, args.surrogate_episodes)
    figures.update(surrogate)
    details.update(surrogate_details)
    visited, visited_details = visited_figures(args.policy, args.visited_episodes)
    figures.update(visited)
    details.update(visited_details)
    report(figures)
    Path(args.out).write_text(json.dumps({**figures, "details": details}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
