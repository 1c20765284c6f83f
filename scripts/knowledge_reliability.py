"""Which knowledge metric ranks allocations of one budget by the allocation, not by the facts sampled?

    python scripts/knowledge_reliability.py docs/results/knowledge-answer/results.json \
        --out docs/results/knowledge-answer/reliability.md

Split-half reliability, per target: the held-out facts are split at random into two halves; each metric
is computed on each half for every allocation of that target (one record per agent, reused seeds left
out), and the Spearman correlation of the two halves' values across the allocations says how much of the
metric's ranking is the allocation's (1) and how much the facts' draw (0). The mean over `--splits` random
splits is reported for answer-balanced retention, answer-balanced accuracy and the answer-balanced answer
perplexity (prune_env/data/knowledge.py). A reward that cannot rank allocations on one half of the facts
as it does on the other cannot teach a policy which allocation keeps more knowledge.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from prune_bench.intervals import fact_labels
from prune_bench.store import ResultsError, load_results
from prune_env.data.knowledge import BalancedIndex

METRICS = {  # name -> (per-fact field, counted facts: "known" = the dense model's greedy-exact ones)
    "balanced retention": ("greedy_exact", "known"),
    "balanced accuracy": ("correct", "all"),
    "answer perplexity": ("answer_nll", "all"),
}


def split_half(values: np.ndarray, index: BalancedIndex, within: np.ndarray, splits: int, seed: int) -> float | None:
    """Mean over random halvings of the facts of Spearman(metric on half A, metric on half B) across the rows
    of `values` (allocations x facts); None where it is undefined (a half with under 3 distinct values: one
    allocation that keeps a fact where all others keep none would read as a perfect ranking)."""
    rng = np.random.default_rng(seed)
    n = values.shape[1]
    rhos = []
    for _ in range(splits):
        order = rng.permutation(n)
        weights = np.zeros((2, n))  # one row per half: both halves in one balanced mean
        weights[0, order[:n // 2]] = weights[1, order[n // 2:]] = 1.0
        halves = index.means(values, within, weights)[0].T
        if min(len(np.unique(h)) for h in halves) >= 3:  # a metric nearly constant across allocations ranks nothing
            rhos.append(float(spearmanr(*halves).statistic))
    return float(np.mean(rhos)) if rhos else None


def reliability(results: dict, splits: int = 50, seed: int = 0) -> dict[float, dict]:
    """{target: {"allocations": n, metric: mean split-half Spearman or None}} of one results.json."""
    labels = fact_labels(results)
    if labels is None:
        raise ValueError("the results have no relation/answer per fact: run `python benchmark.py --out DIR "
                         "--report-only` to add them")
    index = BalancedIndex.of(*labels)
    known = np.asarray(results["dense_per_fact"]["greedy_exact"], bool)
    records = [r for r in results["records"] if r["status"] == "ok" and r.get("per_fact")
               and r.get("reused_from_seed") is None]
    table = {}
    for target in sorted({r["target_sparsity"] for r in records}):
        at = [r for r in records if r["target_sparsity"] == target]
        row: dict = {"allocations": len(at)}
        for name, (field, counted) in METRICS.items():
            if len(at) < 3 or any(field not in r["per_fact"] for r in at):
                row[name] = None
                continue
            values = np.asarray([r["per_fact"][field] for r in at], float)
            within = known if counted == "known" else np.ones(values.shape[1], bool)
            row[name] = split_half(values, index, within, splits, seed)
        table[target] = row
    return table


def markdown(table: dict[float, dict], splits: int) -> str:
    names = list(METRICS)
    lines = [f"Split-half reliability (mean Spearman over {splits} random halvings of the facts; 1: the ranking "
             "is the allocation's, 0: the facts' draw)", "",
             "| target | allocations | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for target, row in table.items():
        cells = ["-" if row[n] is None else f"{row[n]:.2f}" for n in names]
        lines.append(f"| {target:g} | {row['allocations']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmark's results.json (per-fact values kept)")
    parser.add_argument("--splits", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        text = markdown(reliability(load_results(args.results), args.splits, args.seed), args.splits)
    except (OSError, ResultsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out is not None:
        from prune_env.files import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
