"""Reference scores: what uniform, the best one-line rule and the best known agent return on each task.

Like Atari's human-normalised score, a return is placed between two published anchors:

    normalised = (return - uniform) / (best_known - uniform)      0 = uniform Wanda, 1 = best known

A task is "model/method/granularity/fidelity" (e.g. "smollm2-135m/wanda/block/exact") played on
LayerPrune-v1 (block granularity: identical to v0) with the default reward (`RewardConfig()`) and the
default data (`DataConfig()`); the return of that reward is the final quality (no shaping). The table
(`reference_scores.json`, package data) holds, per target, every played agent's return, uniform's,
the best rule's and the best known agent's; between two table targets the anchors are interpolated
linearly. `python scripts/reference_scores.py` regenerates it (resumable; the exact pass takes about
half an hour on 2 cores).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("reference_scores.json")
REGENERATE = "python scripts/reference_scores.py"


def task_key(model: str, method: str, granularity: str, fidelity: str) -> str:
    return f"{model}/{method}/{granularity}/{fidelity}"


def task_for(context, fidelity: str, reward_config) -> str | None:
    """The table's task of an env's PruningContext, fidelity and RewardConfig; None when the reward or the
    data are not the defaults the table was played with (then no reference applies)."""
    from ..context import DataConfig
    from .rewards import RewardConfig

    if reward_config != RewardConfig() or context.data != DataConfig() or context.pattern is not None:
        return None
    return task_key(context.spec, context.method, context.granularity, fidelity)


@lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict:
    """The table: {"tasks": {task: {target (str): {"uniform", "best_rule", "best_known", "returns"}}}, ...}."""
    source = Path(path) if path is not None else TABLE
    try:
        table = json.loads(source.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no reference table at {str(source)!r}: regenerate it with {REGENERATE}") from None
    if not isinstance(table, dict) or not isinstance(table.get("tasks"), dict):
        raise ValueError(f"{str(source)!r} is not a reference table (no 'tasks' mapping): regenerate it with "
                         f"{REGENERATE}")
    return table


def tasks(path: str | None = None) -> list[str]:
    return sorted(load_table(path)["tasks"])


def anchors(task: str, target: float, path: str | None = None) -> tuple[float, float] | None:
    """(uniform, best_known) returns at `target`, interpolated between table targets; None for an unknown
    task or a target outside the table's range."""
    rows = load_table(path)["tasks"].get(task)
    if not rows or not isinstance(target, (int, float)) or not math.isfinite(target):
        return None
    points = sorted((float(t), row["uniform"], row["best_known"]["return"]) for t, row in rows.items())
    for (t0, u0, b0), (t1, u1, b1) in zip(points, points[1:]):
        if t0 - 1e-9 <= target <= t1 + 1e-9:
            w = 0.0 if t1 == t0 else min(max((target - t0) / (t1 - t0), 0.0), 1.0)
            return u0 + w * (u1 - u0), b0 + w * (b1 - b0)
    if len(points) == 1 and abs(points[0][0] - target) <= 1e-9:
        return points[0][1], points[0][2]
    return None


def normalised_score(task: str, target: float, episode_return: float, path: str | None = None) -> float | None:
    """0 = uniform's return, 1 = the best known agent's, at this target; None where the table does not
    cover (task, target), where best known does not beat uniform, or for a non-finite return."""
    pair = anchors(task, target, path)
    if pair is None or not math.isfinite(episode_return):
        return None
    uniform, best = pair
    if not best - uniform > 1e-12:
        return None
    return (float(episode_return) - uniform) / (best - uniform)


def markdown(path: str | None = None) -> str:
    """The table as Markdown: one row per task and target (what the README and the env docstring show)."""
    lines = ["| task | target | uniform | best rule | best known |", "|---|---|---|---|---|"]
    for task, rows in sorted(load_table(path)["tasks"].items()):
        for target in sorted(rows, key=float):
            row = rows[target]
            rule, best = row["best_rule"], row["best_known"]
            lines.append(f"| {task} | {float(target):.1f} | {row['uniform']:.4f} | {rule['name']} "
                         f"{rule['return']:.4f} | {best['name']} {best['return']:.4f} |")
    return "\n".join(lines)
