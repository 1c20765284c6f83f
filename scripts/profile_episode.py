"""Where the time of one exact LayerPrune-v0 episode goes, next to one full evaluation on the same slices.

    python scripts/profile_episode.py [--model smollm2-135m] [--target 0.5] [--out profile.json]

Times each phase of a uniform episode by wrapping the environment's own calls (no sampling profiler):
block forwards that carry the calibration, text and fact hidden states past a pruned block, Wanda's
statistics pass, mask selection and application, and the final LM head and scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import prune_env.pruning.sequential as pruner_module  # (the sequential pass the env drives)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import gymnasium as gym

    env = gym.make("prune_env/LayerPrune-v0", model=args.model, target_sparsity=args.target).unwrapped
    seconds: dict[str, float] = defaultdict(float)

    def timed(label, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[label(*a, **k) if callable(label) else label] += time.perf_counter() - start
        return wrapper

    def advance_label(model, state, *rest):
        name = next((k for k, v in (env._states or {}).items() if v is state), "other")
        return f"block forwards: {name}"

    pruner_module.advance = timed(advance_label, pruner_module.advance)
    pruner_module.block_stats = timed("Wanda statistics pass", pruner_module.block_stats)
    pruner_module.prune_linear = timed("mask selection + apply", pruner_module.prune_linear)
    env._finish = timed("final LM head + scores", env._finish)

    def episode():
        env.reset(seed=0)
        for _ in env.units:
            env.step(env.action_for_ratio(args.target))

    episode()  # warm-up (caches, allocator)
    seconds.clear()
    start = time.perf_counter()
    episode()
    episode_s = time.perf_counter() - start
    start = time.perf_counter()
    env.context.evaluate()
    eval_s = time.perf_counter() - start
    seconds["other (observations, bookkeeping)"] = episode_s - sum(seconds.values())
    print(f"exact episode {episode_s:.2f} s, full evaluation {eval_s:.2f} s, ratio {episode_s / eval_s:.3f}")
    for label, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:36s} {value:7.2f} s  {100 * value / episode_s:5.1f} %")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "episode_s": episode_s, "eval_s": eval_s,
                                              "phases_s": dict(seconds)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
