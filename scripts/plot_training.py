"""Learning curves of train.py runs: exact reward, perplexity and fact retention versus training steps.

    python scripts/plot_training.py runs/ppo-smollm2-50 --out docs/results/ppo-smollm2-50/learning_curve.png
    python scripts/plot_training.py runs/ppo-surrogate-{0,1,2} --out curve.png   # seeds: mean and min-max band

The reward is the exact-fidelity episode reward of the deterministic policy on the environment's
reward slices (each run's eval.jsonl); held-out comparisons against the heuristics come from
benchmark.py. Several runs (training seeds) are drawn as their mean over the steps they all evaluated,
with the band between the lowest and highest seed; the step-0 point of a run with `eval.at_start` is the
untrained policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PANELS = (("reward", "exact episode reward"), ("ppl", "perplexity (env eval slice)"),
          ("fact_retention", "fact retention"))


def read_runs(run_dirs: list[str]) -> list[list[dict]]:
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "eval.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {run_dir!r} a train.py run folder?")
        runs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return runs


def curves(runs: list[list[dict]], key: str) -> tuple[list[int], np.ndarray]:
    """The steps every run evaluated, and a (runs, steps) array of `key` at those steps."""
    steps = sorted(set.intersection(*({r["step"] for r in rows} for rows in runs)))
    values = np.asarray([[next(r[key] for r in rows if r["step"] == step) for step in steps] for rows in runs],
                        dtype=float)
    return steps, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="one train.py run folder per training seed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.run_dirs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    label = "PPO policy (deterministic)" if len(runs) == 1 else f"PPO, mean of {len(runs)} seeds (band: min-max)"
    for ax, (key, title) in zip(axes, PANELS):
        steps, values = curves(runs, key)
        ax.plot(steps, values.mean(axis=0), marker="o", markersize=3, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.25)
        ax.set_xlabel("training steps")
        ax.set_title(title)
    axes[0].legend(loc="lower right", fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(runs)} run(s), {len(curves(runs, 'reward')[0])} common evaluation steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
