"""Who won: a policy's mean over its training seeds against every other agent of a benchmark grid.

    python scripts/learned_summary.py docs/results/learned-smollm2/results.json --policy ppo-s0 ppo-s1 ppo-s2 \
        --out docs/results/learned-smollm2/summary.md

For each target, the policies' records (one per training seed) are paired with the other agent's record
(the same held-out windows and facts) and `prune_bench.intervals.paired_bootstrap` gives the 95 % interval
of the mean over the seeds of: perplexity ratio (policy / other), fact-accuracy difference and
fact-retention difference. "beats" means the interval excludes no difference in the policy's favour.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_bench.intervals import Interval, paired_bootstrap  # noqa: E402
from prune_bench.report import format_interval  # noqa: E402
from prune_bench.store import ResultsError, load_results  # noqa: E402


def verdict(interval: Interval | None, digits: int = 3) -> str:
    return format_interval(interval, digits, tie="tie", missing="n/a")


def summary(results: dict, policies: list[str]) -> list[str]:
    records = [r for r in results["records"] if r["status"] == "ok" and r.get("per_window")]
    dense_exact = results.get("dense_per_fact", {}).get("greedy_exact")
    lines = []
    for target in sorted({r["target_sparsity"] for r in records}):
        at = {r["agent"]: r for r in records if r["target_sparsity"] == target and r["seed"] == 0}
        mine = [at[p] for p in policies if p in at]
        if len(mine) != len(policies):
            lines += [f"target {target}: policies missing ({sorted(set(policies) - set(at))})", ""]
            continue
        mean = {k: float(np.mean([r[k] for r in mine])) for k in ("ppl", "fact_acc", "fact_retention")}
        lines += [f"### target {target}: mean of {len(mine)} policies: ppl {mean['ppl']:.2f}, fact acc "
                  f"{mean['fact_acc']:.3f}, retention {mean['fact_retention']:.3f}", "",
                  "| against | its ppl / acc / retention | ppl ratio (policies / it) | fact acc diff | retention diff |",
                  "|---|---|---|---|---|"]
        for name, other in sorted(at.items(), key=lambda item: item[1]["ppl"]):
            if name in policies:
                continue
            result = paired_bootstrap(mine, [other] * len(mine), dense_exact)
            lines.append(f"| {name} | {other['ppl']:.2f} / {other['fact_acc']:.3f} / {other['fact_retention']:.3f} | "
                         f"{verdict(result.ppl_ratio, 4)} | {verdict(result.acc_diff)} | {verdict(result.retention_diff)} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--policy", nargs="+", required=True, help="the agent labels of the policy's seeds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
    except (OSError, ResultsError) as error:
        print(f"error: {args.results} is not a readable results.json: {error}", file=sys.stderr)
        return 2
    text = "\n".join(summary(results, args.policy)) + "\n"
    print(text)
    if args.out is not None:
        from prune_env.files import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
