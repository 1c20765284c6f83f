"""Learning curve of a train.py run: exact reward, perplexity and fact retention versus training steps.

    python scripts/plot_training.py runs/ppo-smollm2-50 --out docs/results/ppo-smollm2-50/learning_curve.png

The reward is the exact-fidelity episode reward of the deterministic policy on the environment's
reward slices; held-out comparisons against the heuristics come from benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    path = Path(args.run_dir) / "eval.jsonl"
    if not path.is_file():
        print(f"error: {path} does not exist: is {args.run_dir!r} a train.py run folder?", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("reward", "ppl", "fact_retention"),
                              ("exact episode reward", "perplexity (env eval slice)", "fact retention")):
        ax.plot(steps, [r.get(key) for r in rows], marker="o", label="PPO policy (deterministic)")
        ax.set_xlabel("training steps")
        ax.set_title(label)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(rows)} evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
