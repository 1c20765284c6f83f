"""Who won: a policy's mean over its training seeds against every other agent of a benchmark grid.

    python scripts/learned_summary.py docs/results/learned-smollm2/results.json --policy ppo-s0 ppo-s1 ppo-s2 \
        --out docs/results/learned-smollm2/summary.md

For each target, the policies' records (one per training seed) are paired with the other agent's record
(the same held-out windows and facts) and `prune_bench.intervals.paired_bootstrap` gives the 95 % interval
of the mean over the seeds of: perplexity ratio (policy / other), fact-accuracy difference,
fact-retention differences (plain and answer-balanced) and the answer-perplexity ratio (records that keep
per-fact answer NLLs: the column is left out for grids written before them). "beats" means the interval
excludes no difference in the policy's favour.

Several results.json of one grid run with different calibration draws (`data.calib_seed`; the same
held-out windows and facts) pool: every (draw, policy seed) pair counts once, paired within its draw, so
the verdict is of the mean over draws and seeds (configs/benchmark-calibration-draws.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from prune_bench.intervals import Interval, fact_labels, paired_bootstrap
from prune_bench.report import format_interval
from prune_bench.store import ResultsError, load_results


def verdict(interval: Interval | None, digits: int = 3) -> str:
    return format_interval(interval, digits, tie="tie", missing="n/a")


def _text(results: dict) -> dict:
    """The header's description of the text slices (source, calibration windows, evaluation windows)."""
    return results.get("data", {}).get("text", {})


def _held_out(results: dict) -> tuple:
    """What pairing needs equal across draws: the held-out windows, the facts and the dense model's answers."""
    return (_text(results).get("source"), _text(results).get("evaluation"), results.get("data", {}).get("facts"),
            results.get("dense_per_fact", {}).get("greedy_exact"))


def _means(records: list[dict]) -> dict:
    """Mean over records of each metric; the balanced retention is None where a record lacks it (an old file:
    `python benchmark.py --out DIR --report-only` adds it)."""
    means = {k: float(np.mean([r[k] for r in records])) for k in ("ppl", "fact_acc", "fact_retention")}
    balanced = [r.get("fact_retention_balanced") for r in records]
    means["fact_retention_balanced"] = None if None in balanced else float(np.mean(balanced))
    return means


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(draws: list[dict], policies: list[str]) -> list[str]:
    """The verdict tables of `policies` over one or more results.json (calibration draws of one grid)."""
    if any(_held_out(results) != _held_out(draws[0]) for results in draws[1:]):
        raise ValueError("the results files do not share held-out text windows, facts and dense answers: "
                         "only calibration draws of one grid (data.calib_seed) can be pooled")
    starts = [str(_text(results).get("calibration", {}).get("starts")) for results in draws]
    if len(set(starts)) != len(starts):
        raise ValueError("two results files have the same calibration windows: pool each draw once")
    dense_exact = draws[0].get("dense_per_fact", {}).get("greedy_exact")
    labels = fact_labels(draws[0])
    baseline = (draws[0].get("knowledge_baseline") or {}).get("fact_retention_balanced")
    ok = [[r for r in results["records"] if r["status"] == "ok" and r.get("per_window") and r["seed"] == 0]
          for results in draws]
    answers = all("answer_nll" in r["per_fact"] for records in ok for r in records)
    lines = []
    for target in sorted({r["target_sparsity"] for records in ok for r in records}):
        at = [{r["agent"]: r for r in records if r["target_sparsity"] == target} for records in ok]
        at = [agents for agents in at if agents]  # a draw that did not run this target does not count for it
        missing = sorted({p for agents in at for p in policies if p not in agents})
        if missing:
            lines += [f"target {target}: policies missing ({missing})", ""]
            continue
        mine = [agents[p] for agents in at for p in policies]
        mean = _means(mine)
        over = f"{len(policies)} policies"
        if len(draws) > 1:
            over += f" x {len(at)} calibration draw{'s' * (len(at) > 1)}"
        lines += [f"### target {target}: mean of {over}: ppl {mean['ppl']:.2f}, fact acc "
                  f"{mean['fact_acc']:.3f}, retention {mean['fact_retention']:.3f}, balanced retention "
                  f"{_fmt(mean['fact_retention_balanced'])} (majority baseline {_fmt(baseline)})", "",
                  "| against | its ppl / acc / retention / balanced | ppl ratio (policies / it) | fact acc diff | "
                  "retention diff | balanced retention diff |" + " answer ppl ratio |" * answers,
                  "|---|---|---|---|---|---|" + "---|" * answers]
        others = sorted(set.intersection(*(set(agents) for agents in at)) - set(policies),
                        key=lambda name: (np.mean([agents[name]["ppl"] for agents in at]), name))
        for name in others:
            theirs = [agents[name] for agents in at for _ in policies]
            result = paired_bootstrap(mine, theirs, dense_exact, labels=labels)
            its = _means(theirs)
            lines.append(f"| {name} | {its['ppl']:.2f} / {its['fact_acc']:.3f} / {its['fact_retention']:.3f} / "
                         f"{_fmt(its['fact_retention_balanced'])} | {verdict(result.ppl_ratio, 4)} | "
                         f"{verdict(result.acc_diff)} | {verdict(result.retention_diff)} | "
                         f"{verdict(result.balanced_retention_diff)} |"
                         + f" {verdict(result.answer_ppl_ratio, 4)} |" * answers)
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="one grid's results.json, or its calibration draws")
    parser.add_argument("--policy", nargs="+", required=True, help="the agent labels of the policy's seeds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    draws = []
    for path in args.results:
        try:
            draws.append(load_results(path))
        except (OSError, ResultsError) as error:
            print(f"error: {path} is not a readable results.json: {error}", file=sys.stderr)
            return 2
    try:
        text = "\n".join(summary(draws, args.policy)) + "\n"
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out is not None:
        from prune_env.files import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
