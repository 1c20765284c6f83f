"""Valid moves and allocations made without the model: the zscore-greedy fallback and the candidates
a small local model chooses between (candidate scoring always yields a valid answer)."""

from __future__ import annotations

import json

import numpy as np

from agents.rules import match_budget, zscore_greedy_pick
from agents.llm.memory import Memory
from agents.llm.parsing import ALLOC_MAX_RATIO, EPS, row_index

__all__ = ["budget_match", "candidate_allocations", "candidate_moves", "fallback_move", "zscore_allocation",
           "zscore_greedy"]


def zscore_greedy(table: list[dict], max_sparsity: float, k: int, blocked: set[str] | None = None) -> list[str]:
    """The `k` units with the lowest `z_wanda + z_grad` below the cap (ties: lower index).

    `agents.rules.zscore_greedy_pick` with the blocked units passed as capped.
    """
    blocked = blocked or set()
    zw = [float(r["z_wanda"]) for r in table]
    zg = [float(r["z_grad"]) for r in table]
    eff = [max(max_sparsity, 1.0) if str(r["unit"]) in blocked else float(r["sparsity"]) for r in table]
    return [str(table[i]["unit"]) for i in zscore_greedy_pick(zw, zg, eff, max_sparsity, k)]


def fallback_move(table: list[dict], max_sparsity: float, k: int, memory: Memory, cooldown: int) -> list[str]:
    """zscore-greedy, avoiding the units of recently rolled-back moves while any other unit is left."""
    units = zscore_greedy(table, max_sparsity, k, memory.blocked_units(cooldown))
    return units or zscore_greedy(table, max_sparsity, k)


def candidate_moves(table: list[dict], max_sparsity: float, k: int, memory: Memory,
                    cooldown: int) -> list[tuple[list[str], str]]:
    """A handful of valid moves for candidate scoring: (units, rationale)."""
    elig = [r for r in table if float(r["sparsity"]) < max_sparsity - EPS]
    if not elig:
        return []
    z = {str(r["unit"]): float(r["z_wanda"]) + float(r["z_grad"]) for r in elig}
    pos = {str(r["unit"]): row_index(r, i) for i, r in enumerate(table)}

    def by(key) -> list[str]:
        return [str(r["unit"]) for r in sorted(elig, key=lambda r: (key(r), pos[str(r["unit"])]))]

    combined = by(lambda r: z[str(r["unit"])])
    blocked = memory.blocked_units(cooldown)
    share = {str(r["unit"]): float(r.get("param_share", 0.0)) for r in elig}
    out: list[tuple[list[str], str]] = []

    def add(units: list[str], why: str) -> None:
        if units and all(set(units) != set(u) for u, _ in out):
            out.append((units, why))

    add(combined[:k], f"the {min(k, len(combined))} units with the lowest combined importance z_sum")
    if blocked:
        add([u for u in combined if u not in blocked][:k],
            "lowest combined importance, avoiding units of recently rolled-back moves")
    add(combined[:2], "the two least important units")
    for u in combined[:3]:
        add([u], f"{u} alone: one of the least important units, a cautious step")
    add(by(lambda r: float(r["z_wanda"]))[:k], "the lowest Wanda weight-activation scores")
    add(by(lambda r: float(r["z_grad"]))[:k], "the lowest gradient importance")
    pool = combined[: 2 * k]
    add(sorted(pool, key=lambda u: (-share[u], pos[u]))[:k],
        "low-importance units with the largest parameter share, for faster progress")
    return [(u, w) for u, w in out if not memory.repeats_rollback(u)] or out


def budget_match(ratios: list[float], numel: list[float], target: float,
                 max_ratio: float = ALLOC_MAX_RATIO) -> list[float]:
    """Shift `ratios` (clipped to [0, max_ratio]) so the numel-weighted mean equals `target`
    (`agents.rules.match_budget`, target clipped into [0, max_ratio])."""
    r = np.clip(np.asarray(ratios, dtype=float), 0.0, max_ratio)
    tgt = float(np.clip(target, 0.0, max_ratio))
    return [float(x) for x in match_budget(r.tolist(), list(numel), tgt, high=max_ratio)]


def zscore_allocation(table: list[dict], numel: list[float], target: float, strength: float = 0.5) -> list[float]:
    """More sparsity for units with a low z_sum, `strength` scaling the spread (the one-shot fallback)."""
    z = np.array([float(r["z_wanda"]) + float(r["z_grad"]) for r in table])
    sd = float(z.std()) or 1.0
    spread = strength * min(target, ALLOC_MAX_RATIO - target, 0.25)
    return budget_match((target - spread * z / sd).tolist(), numel, target)


def candidate_allocations(table: list[dict], numel: list[float],
                          target: float) -> list[tuple[str, list[float], str, str]]:
    """Whole allocations for candidate scoring: (label, ratios, rationale, the answer text scored)."""
    names = [str(r["unit"]) for r in table]
    cands = [("uniform", [target] * len(names), "uniform sparsity for every unit")]
    for strength, word in ((0.25, "mildly"), (0.5, "moderately"), (1.0, "strongly")):
        cands.append((f"zscore-{strength}", zscore_allocation(table, numel, target, strength),
                      f"{word} more sparsity for low-importance units"))
    return [(label, ratios, why,
             json.dumps({"ratios": {name: round(v, 3) for name, v in zip(names, ratios)}, "rationale": why}))
            for label, ratios, why in cands]
