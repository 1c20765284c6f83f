"""Paired bootstrap intervals of an agent against a baseline (uniform) on the same held-out data.

"Beats uniform" means a 95 % interval that excludes no difference. Both agents were measured on the
same windows and facts, so each resample draws one set of window indices (for perplexity) and one
set of fact indices (for accuracy and retention) and scores both agents on it: the interval is of the
paired difference. Seeds are paired too (agent seed s against baseline seed s) and the statistic is
averaged over them; the intervals resample data, not seeds (the report's ± std shows the seeds).
The answer-balanced retention (prune_env/data/knowledge.py) is recomputed on each resample from the fact
counts it drew, with the same weighted mean the env reports. numpy; a fixed seed makes every interval
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prune_env.data.knowledge import BalancedIndex

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Point estimate on the full data and the percentile interval over the resamples."""

    estimate: float
    low: float
    high: float
    null: float  # the value meaning "no difference": 1 for a ratio, 0 for a difference
    lower_is_better: bool

    @property
    def verdict(self) -> str:
        """'beats' or 'worse' when the interval excludes `null`, else 'tie'."""
        if self.high < self.null:
            return "worse" if not self.lower_is_better else "beats"
        if self.low > self.null:
            return "beats" if not self.lower_is_better else "worse"
        return "tie"


@dataclass(frozen=True)
class Comparison:
    ppl_ratio: Interval  # agent ppl / baseline ppl
    acc_diff: Interval  # agent accuracy - baseline accuracy
    retention_diff: Interval | None  # None without dense greedy-exact flags, or when none is set
    balanced_retention_diff: Interval | None = None  # also None without the facts' relations and answers
    answer_ppl_ratio: Interval | None = None  # agent / baseline answer perplexity; None without labels or per-fact
    #                                           answer NLLs (records written before they were kept)


def has_paired_data(record: dict) -> bool:
    return record.get("per_window") is not None and record.get("per_fact") is not None


def fact_labels(data: dict) -> tuple[list[str], list[str]] | None:
    """(relation, answer) of every held-out fact from results.json's dense_per_fact, or None in files written
    before the balanced metric (`benchmark.py --report-only` backfills them)."""
    per_fact = data.get("dense_per_fact") or {}
    return (per_fact["relation"], per_fact["answer"]) if {"relation", "answer"} <= set(per_fact) else None


def _interval(samples: np.ndarray, estimate: float, null: float, lower_is_better: bool) -> Interval:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), null, lower_is_better)


def resample_indices(n_windows: int, n_facts: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap's draws: window indices (R, n_windows) and fact indices (R, n_facts), windows first, so
    every statistic of one seed (intervals, fronts) is computed on the same resampled data."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_windows, size=(n_resamples, n_windows)),
            rng.integers(0, n_facts, size=(n_resamples, n_facts)))


def fact_counts(facts: np.ndarray, n_facts: int) -> np.ndarray:
    """How often each fact is drawn in each resample: the weights of the balanced mean (R, n_facts)."""
    return np.stack([np.bincount(row, minlength=n_facts) for row in facts])


def paired_bootstrap(agent: list[dict], baseline: list[dict], dense_exact: list[bool] | None = None,
                     n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     labels: tuple[list[str], list[str]] | None = None) -> Comparison:
    """Intervals of `agent` records against `baseline` records (paired lists, one per seed).

    `labels` = (relation, answer) of every fact (results.json's dense_per_fact) adds the intervals of the
    answer-balanced retention difference and, when every record keeps per-fact answer NLLs, of the balanced
    answer-perplexity ratio, on the same resampled facts as the others."""
    if not agent or len(agent) != len(baseline):
        raise ValueError(f"paired_bootstrap needs one baseline record per agent record, got {len(agent)} "
                         f"and {len(baseline)}")
    nll = np.array([[r["per_window"]["nll"] for r in agent], [r["per_window"]["nll"] for r in baseline]], float)
    tokens = np.array([[r["per_window"]["tokens"] for r in agent], [r["per_window"]["tokens"] for r in baseline]],
                      float)
    correct = np.array([[r["per_fact"]["correct"] for r in agent], [r["per_fact"]["correct"] for r in baseline]],
                       float)
    exact = np.array([[r["per_fact"]["greedy_exact"] for r in agent],
                      [r["per_fact"]["greedy_exact"] for r in baseline]], float)
    n_windows, n_facts = nll.shape[-1], correct.shape[-1]
    windows, facts = resample_indices(n_windows, n_facts, n_resamples, seed)

    def log_ppl_gap(index) -> np.ndarray:  # mean over seeds of log ppl(agent) - log ppl(baseline)
        mean_nll = nll[..., index].sum(-1) / tokens[..., index].sum(-1)
        return (mean_nll[0] - mean_nll[1]).mean(0)

    everything = np.arange(n_windows)
    ppl = _interval(np.exp(log_ppl_gap(windows)), float(np.exp(log_ppl_gap(everything))), 1.0, True)

    def acc_gap(index) -> np.ndarray:
        return (correct[0][:, index] - correct[1][:, index]).mean(-1).mean(0)

    acc = _interval(acc_gap(facts), float(acc_gap(np.arange(n_facts))), 0.0, False)
    retention = None
    known = np.asarray(dense_exact if dense_exact is not None else [], float)
    if dense_exact is not None and known.shape != (n_facts,):
        raise ValueError(f"dense_exact has {known.size} flags but the records have {n_facts} facts")
    if known.sum() > 0:  # retention is undefined when the dense model answers no fact greedy-exact

        def kept_gap(index) -> np.ndarray:
            kept = ((exact[0] - exact[1]) * known)[:, index].sum(-1).mean(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                return kept / known[index].sum(-1)

        retention = _interval(kept_gap(facts), float(kept_gap(np.arange(n_facts))), 0.0, False)
    balanced = answer = None
    answers = labels is not None and all("answer_nll" in r["per_fact"] for r in (*agent, *baseline))
    if labels is not None and (retention is not None or answers):
        index = BalancedIndex.of(*labels)
        if index.groups.shape[0] != n_facts:
            raise ValueError(f"labels name {index.groups.shape[0]} facts but the records have {n_facts} facts")
        counts = fact_counts(facts, n_facts)

        def balanced_gap(values: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, float]:
            """Agent minus baseline balanced mean, per resample and on the full data (mean over seeds)."""
            drawn, _ = index.means(values, within, counts)  # (2, seeds, resamples)
            full, _ = index.means(values, within)  # (2, seeds)
            return (drawn[0] - drawn[1]).mean(0), float((full[0] - full[1]).mean(0))

        if retention is not None:
            balanced = _interval(*balanced_gap(exact, known), 0.0, False)
        if answers:
            answer_nll = np.array([[r["per_fact"]["answer_nll"] for r in agent],
                                   [r["per_fact"]["answer_nll"] for r in baseline]], float)
            drawn, full = balanced_gap(answer_nll, np.ones(n_facts, bool))
            answer = _interval(np.exp(drawn), float(np.exp(full)), 1.0, True)
    return Comparison(ppl, acc, retention, balanced, answer)
