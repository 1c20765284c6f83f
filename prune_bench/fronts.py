"""Trade-off fronts: perplexity against answer-balanced retention, and the hypervolume each agent covers.

Why: an agent that can be asked for more knowledge or for lower perplexity is one point per request; a
rule is one point; comparing single numbers hides the trade-off (issue #26). Each point is one (agent,
setting) at one target, averaged over seeds: x = log(ppl / uniform's ppl) (lower is better), y = the
answer-balanced retention (higher is better). An agent's front is its non-dominated points; its
hypervolume is the area its points dominate inside the reference box [x, x_ref] x [y_ref, y] (default:
up to twice uniform's perplexity, down to no retention). A larger area means better points or more of
them along the trade-off.

The interval is the same paired bootstrap as prune_bench/intervals.py: each resample draws one set of
held-out windows and one set of facts, and every point of every agent (and uniform, the x origin) is
re-scored on it, so the hypervolumes of two agents are compared on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prune_env.data.knowledge import BalancedIndex

from .intervals import BOOTSTRAP_SEED, LEVEL, N_RESAMPLES, fact_counts, fact_labels, resample_indices

X_REFERENCE = float(np.log(2.0))  # the box ends at twice uniform's perplexity
Y_REFERENCE = 0.0


@dataclass(frozen=True)
class FrontSummary:
    """One agent's points at one target, its front and its hypervolume with a bootstrap interval."""

    labels: list[str]  # one per point (e.g. the agent's preference w)
    log_ppl_ratio: np.ndarray  # (points,) on the full held-out data
    retention: np.ndarray  # (points,) answer-balanced
    on_front: np.ndarray  # (points,) bool
    hypervolume: float
    low: float
    high: float


def front_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The non-dominated points: no other point has x <= and y >= with one of them strict."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    no_worse = (x[None, :] <= x[:, None]) & (y[None, :] >= y[:, None])
    better = (x[None, :] < x[:, None]) | (y[None, :] > y[:, None])
    return ~(no_worse & better).any(axis=1)


def hypervolume(x: np.ndarray, y: np.ndarray, x_ref: float = X_REFERENCE, y_ref: float = Y_REFERENCE) -> np.ndarray:
    """Area dominated by the points inside [., x_ref] x [y_ref, .] (x lower and y higher is better).

    x, y (..., points): leading axes are independent sets (e.g. bootstrap resamples). Points outside the
    box add nothing; NaN points are ignored. Sweep: sort by x, the best y so far holds until the next x.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    valid = np.isfinite(x) & np.isfinite(y)
    x = np.where(valid, np.minimum(x, x_ref), x_ref)
    height = np.where(valid, np.maximum(y - y_ref, 0.0), 0.0)
    order = np.argsort(x, axis=-1)
    xs, hs = np.take_along_axis(x, order, -1), np.take_along_axis(height, order, -1)
    best = np.maximum.accumulate(hs, axis=-1)
    widths = np.diff(np.concatenate([xs, np.full(xs.shape[:-1] + (1,), x_ref)], axis=-1), axis=-1)
    return (widths * best).sum(-1)


def _log_ppl(records: list[dict], windows: np.ndarray) -> np.ndarray:
    """Mean over seeds of the mean NLL per token on the drawn windows: (resamples,)."""
    nll = np.array([r["per_window"]["nll"] for r in records], float)
    tokens = np.array([r["per_window"]["tokens"] for r in records], float)
    return (nll[:, windows].sum(-1) / tokens[:, windows].sum(-1)).mean(0)


def _retention(records: list[dict], index: BalancedIndex, known: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over seeds of the answer-balanced retention on the drawn facts: (resamples,)."""
    exact = np.array([r["per_fact"]["greedy_exact"] for r in records], float)
    drawn, _ = index.means(exact, known, counts)  # (seeds, resamples)
    return drawn.mean(0)


def fronts(points: dict[str, dict[str, list[dict]]], baseline: list[dict], dense_exact: list[bool],
           labels: tuple[list[str], list[str]], n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
           x_ref: float = X_REFERENCE) -> dict[str, FrontSummary]:
    """Each agent's front and hypervolume at one target.

    Args:
        points: agent -> point label -> the point's records (one per seed, results.json records with
            per_window and per_fact).
        baseline: uniform's records at the same target (the x origin), paired with nothing: its mean over
            seeds is the reference perplexity on each resample.
        dense_exact: the dense model's greedy-exact flag per held-out fact (results.json dense_per_fact).
        labels: (relation, answer) per held-out fact, for the balanced retention.
        n_resamples, seed: the bootstrap (resample 0 is not special: the estimate uses all data).
        x_ref: the box's perplexity end, as log(ppl / uniform's ppl).
    """
    n_windows = len(baseline[0]["per_window"]["nll"])
    index = BalancedIndex.of(*labels)
    known = np.asarray(dense_exact, bool)
    n_facts = known.size
    if index.groups.shape[0] != n_facts:
        raise ValueError(f"labels name {index.groups.shape[0]} facts but dense_exact has {n_facts}")
    drawn_windows, drawn_facts = resample_indices(n_windows, n_facts, n_resamples, seed)
    windows = np.vstack([np.arange(n_windows), drawn_windows])  # row 0: all data (the estimate)
    counts = np.vstack([np.ones(n_facts), fact_counts(drawn_facts, n_facts)])
    uniform_log_ppl = _log_ppl(baseline, windows)  # row 0: all data
    summaries = {}
    for agent, by_label in points.items():
        names = list(by_label)
        x = np.stack([_log_ppl(by_label[name], windows) - uniform_log_ppl for name in names], -1)
        y = np.stack([_retention(by_label[name], index, known, counts) for name in names], -1)
        areas = hypervolume(x, y, x_ref)
        tail = (1 - LEVEL) / 2 * 100
        low, high = np.nanpercentile(areas[1:], [tail, 100 - tail])
        summaries[agent] = FrontSummary(names, x[0], y[0], front_mask(x[0], y[0]), float(areas[0]), float(low),
                                        float(high))
    return summaries


def plot_fronts(summaries: dict[str, FrontSummary], target: float, path) -> None:
    """One figure per target: every point, each agent's front as a step line (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.5, 4.5))
    colours = plt.get_cmap("tab20").colors
    for number, (agent, summary) in enumerate(summaries.items()):
        colour, marker = colours[number % 20], "osD^v<>p"[number % 8]
        ratio = np.exp(summary.log_ppl_ratio)
        axis.scatter(ratio, summary.retention, s=24, alpha=0.8, color=colour, marker=marker,
                     label=f"{agent} (HV {summary.hypervolume:.3f})")
        order = np.argsort(ratio[summary.on_front])
        axis.step(ratio[summary.on_front][order], summary.retention[summary.on_front][order], where="post",
                  color=colour)
    axis.axvline(1.0, color="grey", lw=0.8, ls=":")
    axis.set_xlabel("perplexity / uniform's (lower is better)")
    axis.set_ylabel("answer-balanced retention")
    axis.set_title(f"trade-off fronts at sparsity {target:g}")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def point_agent(label: str) -> str:
    """The agent a cell label belongs to: 'ppo-pref@w=0.7' -> 'ppo-pref' (each preference is one point of
    its agent's front); a label without '@' is an agent of one point."""
    return label.split("@", 1)[0]


def front_lines(data: dict, rows: list[dict], target: float, out, baseline: str | None) -> list[str]:
    """report.md's trade-off section at one target: each agent's hypervolume with its interval, and the plot
    front_t<target>.png. Empty without the per-window and per-fact data or the facts' names (old files:
    `--report-only` backfills the names)."""
    labels = fact_labels(data)
    if baseline is None or labels is None:
        return []
    at = {row["agent"]: row["records"] for row in rows if row["target"] == target and row["records"]}
    if baseline not in at or not all(r.get("per_window") and r.get("per_fact") for rs in at.values() for r in rs):
        return []
    points: dict[str, dict[str, list[dict]]] = {}
    for label, records in at.items():
        points.setdefault(point_agent(label), {})[label] = records
    summaries = fronts(points, at[baseline], data["dense_per_fact"]["greedy_exact"], labels)
    name = f"front_t{target:g}.png"
    plot_fronts(summaries, target, out / name)
    lines = [f"Trade-off front (prune_bench/fronts.py): x = log(ppl / {baseline}'s), y = balanced retention; "
             f"hypervolume inside x <= log 2, y >= 0, with its paired bootstrap interval (95 %).", "",
             "| agent | points | on its front | hypervolume |", "|---|---|---|---|"]
    for agent, summary in sorted(summaries.items(), key=lambda item: -item[1].hypervolume):
        lines.append(f"| {agent} | {len(summary.labels)} | {int(summary.on_front.sum())} | "
                     f"{summary.hypervolume:.4f} [{summary.low:.4f}, {summary.high:.4f}] |")
    return lines + ["", f"![{name}]({name})", ""]
