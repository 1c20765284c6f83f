"""IterativePrune's increment arithmetic: which units a bin action touches, and how one step's increments are
spread over units and linears in whole weights so that the global sparsity lands exactly on the target."""

from __future__ import annotations

import math


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split `total` whole weights in proportion to `weights`, none above its cap (largest remainder).

    Each share is within one of its exact proportional value unless a cap binds; needs sum(caps) >= total.
    """
    n = len(weights)
    wsum = float(sum(weights))
    shares = [total * w / wsum for w in weights] if wsum > 0 else [0.0] * n
    out = [min(int(math.floor(s)), c) for s, c in zip(shares, caps)]
    left = total - sum(out)
    order = sorted(range(n), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    while left > 0:
        progressed = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise AssertionError(f"cannot apportion {total} over caps {caps}")  # callers guarantee capacity
    return out


def depth_bins(n_units: int, bins: int) -> list[list[int]]:
    """The units of each of `bins` equal depth bins (unit i -> bin floor(i * bins / n)); a bin that holds
    no unit (more bins than units) takes the unit nearest its centre, so every bin acts on something."""
    members: list[list[int]] = [[] for _ in range(bins)]
    for i in range(n_units):
        members[i * bins // n_units].append(i)
    for k, group in enumerate(members):
        if not group:
            group.append(min(n_units - 1, int((k + 0.5) * n_units / bins)))
    return members


def propose_increments(zeros: list[list[int]], nominal: list[float], selected: list[int], units, increment: float,
                       max_sparsity: float, budget: int) -> tuple[list[list[int]], list[float]]:
    """Per-linear zero counts and nominal ratios after one step that raises each selected unit by `increment`
    (up to `max_sparsity`). `budget`: the weights still to prune to reach the target; a step that would pass
    it scales every unit's increment by the same fraction (largest remainder over units, then linears)."""
    proposal, proposed = [list(z) for z in zeros], list(nominal)
    grow = [u for u in selected if nominal[u] < max_sparsity - 1e-12]
    for u in grow:
        proposed[u] = min(nominal[u] + increment, max_sparsity)
        proposal[u] = [max(old, round(proposed[u] * ref.numel)) for old, ref in zip(zeros[u], units[u].linears)]
    added = sum(sum(proposal[u]) for u in grow) - sum(sum(zeros[u]) for u in grow)
    if added <= budget:
        return proposal, proposed
    # uniform down-scaling: every unit gets the same fraction of its requested increment
    requested = [(proposed[u] - nominal[u]) * units[u].numel for u in grow]
    caps = [sum(proposal[u]) - sum(zeros[u]) for u in grow]
    shares = apportion(budget, requested, caps)
    fraction = budget / sum(requested)
    for u, share in zip(grow, shares):
        linear_caps = [new - old for new, old in zip(proposal[u], zeros[u])]
        extra = apportion(share, [ref.numel for ref in units[u].linears], linear_caps)
        proposal[u] = [old + e for old, e in zip(zeros[u], extra)]
        proposed[u] = nominal[u] + fraction * (proposed[u] - nominal[u])
    return proposal, proposed
