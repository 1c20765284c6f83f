"""Pure per-unit sparsity allocation rules (no environment dependency).

Every allocator returns a list of per-unit sparsity ratios whose *parameter-weighted*
mean equals the target (to 1e-9) whenever unit sizes are given, so that different rules are
compared at exactly the same global budget. The one projection used for that is
`match_budget` (additive shift + clip); AlphaPruning keeps its reference's multiplicative
scaler instead (see `alphapruning_ratios`).

Rules implemented:
- uniform: every unit gets the target.
- OWL (Yin et al., ICML 2024; luuyin/OWL `check_outlier_mean` + the `Lamda` mapping):
  blocks with more Wanda-score outliers are pruned less.
- AlphaPruning (Lu et al., NeurIPS 2024; haiquanlu/AlphaPruning `net_esd_estimator`
  with `fix_fingers='xmin_peak'` + `ww_sparsity`): layers with a smaller power-law
  exponent of the weight spectrum (heavier tail, better trained) are pruned less.
- z-score greedy: the paper's sensitivity profile (z-scored 10th-percentile Wanda score +
  z-scored gradient magnitude) used by a fixed rule instead of an LLM.
- random: a seeded random allocation at the same budget (a control).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "MAX_RATIO",
    "alphapruning_ratios",
    "hill_alpha",
    "match_budget",
    "owl_outlier_ratio",
    "owl_ratios",
    "owl_ratios_from_lod",
    "random_ratios",
    "uniform_ratios",
    "zscore_greedy_pick",
    "zscore_greedy_ratios",
]

MAX_RATIO = 0.99
"""Upper clip for a unit's sparsity: a fully pruned unit breaks the forward pass."""

_BUDGET_TOL = 1e-9


# --------------------------------------------------------------------------- validation


def _check_target(target: float) -> float:
    """Reject budgets outside (0, 1): 0 is 'no pruning' and 1 deletes the model."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target sparsity must be a number in (0, 1), got {target!r}") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"target sparsity must be in the open interval (0, 1), got {target!r}")
    return value


def _as_numel(numel: Sequence[int], length: int | None = None, what: str = "numel") -> np.ndarray:
    """Parameter counts as float64; they weight the budget, so they must be positive."""
    n = np.asarray(list(numel), dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence")
    if length is not None and n.size != length:
        raise ValueError(f"{what} has {n.size} entries, expected {length}")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"{what} entries must be positive and finite")
    return n


def _as_vector(values: Sequence[float], what: str, length: int | None = None) -> np.ndarray:
    """Finite 1-D float64 vector (NaN scores would silently poison every allocation)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence")
    if length is not None and v.size != length:
        raise ValueError(f"{what} has {v.size} entries, expected {length}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be finite")
    return v


# --------------------------------------------------------------------------- shared projection


def match_budget(
    ratios: Sequence[float],
    numel: Sequence[int],
    target: float,
    low: float = 0.0,
    high: float = MAX_RATIO,
) -> list[float]:
    """Shift all ratios by one constant c and clip to [low, high] so that the
    parameter-weighted sparsity sum(n * r) / sum(n) equals `target`.

    Why a shift: it keeps every difference between units that survives clipping, i.e. it
    changes a rule's *level* but not its *shape*. f(c) = sum(w * clip(r + c)) is
    continuous, non-decreasing and piecewise linear with breakpoints low - r_i and
    high - r_i, so c is found by binary search over the sorted breakpoints followed by an
    exact linear solve inside the bracketing segment (no iteration tolerance; the result
    meets the budget to float64 round-off, far below 1e-9).
    """
    r = _as_vector(ratios, "ratios")
    n = _as_numel(numel, r.size)
    low, high, tgt = float(low), float(high), float(target)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"need finite low <= high, got low={low}, high={high}")
    if not math.isfinite(tgt) or not low <= tgt <= high:
        raise ValueError(
            f"target sparsity {tgt} cannot be met with every ratio clipped to [{low}, {high}]"
        )
    w = n / n.sum()
    if low == high:
        return [low] * r.size

    breaks = np.unique(np.concatenate([low - r, high - r]))
    values = np.clip(r[None, :] + breaks[:, None], low, high) @ w  # non-decreasing
    j = int(np.searchsorted(values, tgt, side="left"))
    if j == 0:
        shift = float(breaks[0])
    elif j >= breaks.size:
        shift = float(breaks[-1])
    else:
        b0, b1, v0, v1 = breaks[j - 1], breaks[j], values[j - 1], values[j]
        shift = float(b1) if v1 == v0 else float(b0 + (tgt - v0) * (b1 - b0) / (v1 - v0))
    out = np.clip(r + shift, low, high)
    err = float(out @ w) - tgt
    if abs(err) > _BUDGET_TOL:
        # Round-off only: absorb it in the units strictly inside (low, high).
        free = (out > low) & (out < high)
        if free.any():
            out[free] -= err / w[free].sum()
            out = np.clip(out, low, high)
    return [float(x) for x in out]


# --------------------------------------------------------------------------- uniform


def uniform_ratios(n_units: int, target: float) -> list[float]:
    """Every unit pruned at the target: the baseline all other rules are compared to."""
    tgt = _check_target(target)
    if int(n_units) != n_units or n_units < 1:
        raise ValueError(f"n_units must be a positive integer, got {n_units!r}")
    return [tgt] * int(n_units)


# --------------------------------------------------------------------------- OWL


def owl_outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """Layerwise Outlier Distribution (LOD) of one decoder block: the share (in [0, 1]) of
    entries of its flattened Wanda scores |W| * ||X||_2 (all its linears concatenated)
    that are strictly greater than m times their mean.

    OWL's `check_outlier_mean` returns the same quantity in percent; only relative values
    matter for the allocation (it is min-max normalised), so a fraction is returned.
    The mean is taken in float64 so that large fp16/bf16 blocks do not lose precision.
    """
    if m <= 0 or not math.isfinite(m):
        raise ValueError(f"outlier multiple m must be positive, got {m!r}")
    flat = scores.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        raise ValueError("scores is empty")
    threshold = flat.mean() * float(m)
    return float((flat > threshold).sum().item()) / flat.numel()


def owl_ratios_from_lod(
    lod: Sequence[float],
    target: float,
    lam: float = 0.08,
    block_numel: Sequence[int] | None = None,
) -> list[float]:
    """OWL's mapping from per-block outlier ratios (LOD) to per-block sparsities.

    Reference mapping: r = (LOD - min) / (max - min) * 2*lam ; r = r - mean(r) + (1 - target);
    sparsity = 1 - r. More outliers => more density kept => less pruning; the spread
    max - min of the sparsities is exactly 2*lam and their plain mean is the target.
    (Each sparsity therefore lies in [target - 2*lam, target + 2*lam]; the paper's
    "[S - lam, S + lam]" only holds when the LOD distribution is symmetric.)

    Deviation for budget exactness: the result is passed through `match_budget` with the
    block sizes (equal weights when `block_numel` is None). With equal-sized blocks and no
    clipping this is the identity; with unequal blocks it shifts all sparsities so the
    *parameter-weighted* sparsity equals the target; if target +- 2*lam leaves
    [0, MAX_RATIO] the excess is clipped and redistributed by the same shift.
    Exposed separately so callers can compute LOD block by block and drop the scores.
    """
    tgt = _check_target(target)
    x = _as_vector(lod, "lod")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite non-negative number, got {lam!r}")
    n = np.ones_like(x) if block_numel is None else _as_numel(block_numel, x.size, "block_numel")
    span = float(x.max() - x.min())
    if span <= 0.0 or lam == 0.0:
        return [tgt] * x.size
    r = (x - x.min()) / span * (2.0 * lam)
    r = r - r.mean() + (1.0 - tgt)
    return match_budget(1.0 - r, n, tgt, 0.0, MAX_RATIO)


def owl_ratios(
    block_scores: Sequence[torch.Tensor],
    target: float,
    lam: float = 0.08,
    m: float = 5.0,
    block_numel: Sequence[int] | None = None,
) -> list[float]:
    """OWL per-block sparsities from each block's concatenated Wanda-score tensor
    (one tensor per decoder block): LOD via `owl_outlier_ratio`, then
    `owl_ratios_from_lod` (see there for the mapping and the budget correction)."""
    tgt = _check_target(target)
    if len(block_scores) == 0:
        raise ValueError("block_scores is empty")
    lod = [owl_outlier_ratio(s, m) for s in block_scores]
    return owl_ratios_from_lod(lod, tgt, lam, block_numel)


# --------------------------------------------------------------------------- AlphaPruning


def _hill_fits(eigs: np.ndarray, log_eigs: np.ndarray, candidates: np.ndarray):
    """Hill estimate and KS distance for each candidate xmin index (ascending eigs)."""
    n_total = eigs.size
    suffix = np.cumsum(log_eigs[::-1])[::-1]  # suffix[i] = sum_{j >= i} log eig_j
    best = (math.inf, math.nan)  # (D, alpha)
    for i in candidates:
        n = n_total - i
        denom = suffix[i] - n * log_eigs[i]  # = sum log(eig_j / xmin)
        if not denom > 0.0:
            continue  # all tail eigenvalues equal xmin: exponent undefined
        alpha = 1.0 + n / denom
        if not (math.isfinite(alpha) and alpha > 1.0):
            continue
        tail = eigs[i:] / eigs[i]
        ks = float(np.max(np.abs(1.0 - tail ** (1.0 - alpha) - np.arange(n) / n)))
        if ks < best[0]:  # strict: ties keep the smaller xmin, like torch.argmin
            best = (ks, alpha)
    return best


def hill_alpha(
    weight: torch.Tensor,
    bins: int = 100,
    *,
    xmin_window: Literal["reference", "intended"] = "reference",
) -> float:
    """AlphaPruning's PL_Alpha_Hill ('alpha_peak') of one weight matrix.

    Why: a smaller exponent of the power-law tail of the empirical spectral density means
    a heavier-tailed, better-trained layer, which AlphaPruning prunes less.

    Exactly what is computed (following `net_esd_estimator(fix_fingers='xmin_peak')`):
    1. eig = svdvals(W)**2 on CPU (eigenvalues of W^T W), sorted ascending; the SVD runs in
       float32 (float64 only for a float64 W) and everything after it in float64;
       exact zeros are dropped (their log is -inf); N = number kept.
    2. Histogram of log10(eig) with `bins` equal-width bins on [min, max]; the first bin
       with the largest count is the peak; xmin2 = 10 ** (left edge of the peak bin).
    3. Candidate xmins: eig_i for i in 0..N-2 (never the largest) with
       lower <= eig_i <= 1.5 * xmin2, where lower = log10(0.95 * xmin2) with
       `xmin_window='reference'` (what the reference code does: it compares an eigenvalue
       with a log10 value, so in practice the window reaches down to the smallest
       eigenvalues) or lower = 0.95 * xmin2 with `xmin_window='intended'` (the window
       weightwatcher / later ports use).
    4. For each candidate, over the tail eig_i..eig_{N-1} (n = N - i values):
       alpha = 1 + n / sum_j ln(eig_j / eig_i), and the KS distance
       D = max_k |1 - (eig_{i+k} / eig_i) ** (1 - alpha) - k / n|, k = 0..n-1.
       Fits with alpha <= 1 or undefined alpha are skipped (the reference gives them D = 1).
    5. Return the alpha of the minimal D (ties: smallest xmin).
    Deviations: the steps after the SVD run in float64 (the reference stays in float32); if the
    window holds no usable candidate the reference silently returns alpha = 0, here the search
    widens to every i in 0..N-2
    (the reference's fix_fingers=None search); a spectrum with no usable fit at all
    (e.g. all singular values equal) raises ValueError.
    """
    if xmin_window not in ("reference", "intended"):
        raise ValueError(f"xmin_window must be 'reference' or 'intended', got {xmin_window!r}")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    svd_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(device="cpu", dtype=svd_dtype)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(w.shape)}")
    eigs = np.sort(torch.linalg.svdvals(w).double().square().numpy())
    eigs = eigs[eigs > 0.0]
    if eigs.size < 2:
        raise ValueError("need at least two non-zero singular values to fit a power law")
    log_eigs = np.log(eigs)
    log10_eigs = np.log10(eigs)
    lo, hi = float(log10_eigs.min()), float(log10_eigs.max())
    if hi > lo:
        counts, edges = np.histogram(log10_eigs, bins=int(bins), range=(lo, hi))
        xmin2 = 10.0 ** float(edges[int(np.argmax(counts))])
    else:
        xmin2 = float(eigs[0])
    lower = math.log10(0.95 * xmin2) if xmin_window == "reference" else 0.95 * xmin2
    upper = 1.5 * xmin2
    head = eigs[:-1]
    in_window = np.flatnonzero((head >= lower) & (head <= upper))
    d, alpha = _hill_fits(eigs, log_eigs, in_window)
    if not math.isfinite(d):
        d, alpha = _hill_fits(eigs, log_eigs, np.arange(head.size))
    if not math.isfinite(d):
        raise ValueError("degenerate spectrum: no power-law fit with alpha > 1 exists")
    return float(alpha)


def _scale_to_budget(base: np.ndarray, n: np.ndarray, target: float, high: float) -> np.ndarray:
    """Find s > 0 with sum(n * min(s * base, high)) = target * sum(n): the reference's
    multiplicative scaler, re-solved on the unclipped units whenever some hit `high`."""
    total = target * n.sum()
    capped = np.zeros(base.size, dtype=bool)
    while True:
        free = ~capped
        remaining = total - high * n[capped].sum()
        denom = float((n[free] * base[free]).sum())
        if denom <= 0.0 or remaining < 0.0:
            raise ValueError(f"target {target} is not reachable with ratios capped at {high}")
        scale = remaining / denom
        newly = free & (scale * base > high)
        if not newly.any():
            return np.where(capped, high, scale * base)
        capped |= newly


def alphapruning_ratios(
    alphas: Sequence[float],
    numel: Sequence[int],
    target: float,
    eps: float = 0.3,
    unit_of_layer: Sequence[int] | None = None,
) -> list[float]:
    """AlphaPruning's `ww_sparsity` mapping from per-layer alpha to sparsity ratios.

    1. Optional block-wise mode (`unit_of_layer` maps each linear to unit 0..U-1): each
       unit's alpha is the plain mean of its linears' alphas (every linear weighted
       equally, as the reference's 'block_wise' mapping) and one ratio per unit is returned,
       weighted in the budget by the unit's total parameter count.
    2. Linear map: base = (alpha - min) / (max - min) * 2*eps + (1 - eps), so the smallest
       alpha (heaviest tail, most important) gets the smallest ratio; all equal -> uniform.
    3. ratio = base * scaler, scaler = sum(n) * target / sum(n * base), so the
       parameter-weighted sparsity equals the target exactly.
    Deviation: the reference does not clip; here ratios are capped at MAX_RATIO and the
    scaler is re-solved on the uncapped units until none exceeds it (budget still exact).
    """
    tgt = _check_target(target)
    a = _as_vector(alphas, "alphas")
    n = _as_numel(numel, a.size)
    if not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (ratios must stay non-negative), got {eps!r}")
    if tgt > MAX_RATIO:
        raise ValueError(f"target {tgt} exceeds the per-unit cap {MAX_RATIO}")
    if unit_of_layer is not None:
        units = np.asarray(list(unit_of_layer))
        if units.shape != a.shape or not np.issubdtype(units.dtype, np.integer):
            raise ValueError("unit_of_layer must give one integer unit index per alpha")
        n_units = int(units.max()) + 1 if units.size else 0
        if units.min() < 0 or np.unique(units).size != n_units:
            raise ValueError("unit_of_layer must use every unit index 0..U-1")
        a = np.array([a[units == u].mean() for u in range(n_units)])
        n = np.array([n[units == u].sum() for u in range(n_units)])
    span = float(a.max() - a.min())
    if span <= 0.0:
        base = np.ones_like(a)
    else:
        base = (a - a.min()) / span * (2.0 * eps) + (1.0 - eps)
    out = _scale_to_budget(base, n, tgt, MAX_RATIO)
    return [float(x) for x in out]


# --------------------------------------------------------------------------- z-score rules


def _importance(z_wanda: Sequence[float], z_grad: Sequence[float]) -> np.ndarray:
    """The profile's scalar importance: higher z(Wanda) + z(grad) = more important unit."""
    zw = _as_vector(z_wanda, "z_wanda")
    zg = _as_vector(z_grad, "z_grad", zw.size)
    return zw + zg


def zscore_greedy_ratios(
    z_wanda: Sequence[float],
    z_grad: Sequence[float],
    numel: Sequence[int],
    target: float,
    spread: float = 0.1,
) -> list[float]:
    """One-shot rule on the paper's sensitivity profile (no LLM): the more important a
    unit, the less it is pruned.

    ratio = target - spread * importance / max|importance| (importance = z_wanda + z_grad,
    so the raw ratios lie in [target - spread, target + spread]), then `match_budget`
    (shift + clip to [0, MAX_RATIO]) makes the parameter-weighted sparsity exactly the
    target. All importances zero -> uniform.
    """
    tgt = _check_target(target)
    imp = _importance(z_wanda, z_grad)
    n = _as_numel(numel, imp.size)
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread must be a finite non-negative number, got {spread!r}")
    scale = float(np.abs(imp).max())
    raw = np.full(imp.size, tgt) if scale == 0.0 else tgt - spread * imp / scale
    return match_budget(raw, n, tgt, 0.0, MAX_RATIO)


def zscore_greedy_pick(
    z_wanda: Sequence[float],
    z_grad: Sequence[float],
    sparsity: Sequence[float],
    max_sparsity: float,
    k: int,
) -> list[int]:
    """Indices of the k least important units (lowest z_wanda + z_grad) whose current
    sparsity is still below `max_sparsity` (1e-9 slack, so a unit sitting on the wall up to
    float noise counts as full), ordered by importance then index. Fewer than k are
    returned when fewer units are eligible. The iterative env's deterministic fallback
    move: prune next where the profile says it hurts least.
    """
    imp = _importance(z_wanda, z_grad)
    s = _as_vector(sparsity, "sparsity", imp.size)
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    eligible = np.flatnonzero(s < float(max_sparsity) - 1e-9)
    order = sorted(eligible.tolist(), key=lambda i: (imp[i], i))
    return [int(i) for i in order[: int(k)]]


# --------------------------------------------------------------------------- random


def random_ratios(
    numel: Sequence[int],
    target: float,
    rng: np.random.Generator,
    low: float = 0.0,
    high: float = 0.95,
) -> list[float]:
    """Seeded random control at the same budget: Dirichlet(1, ..., 1) weights scaled to
    mean `target` (raw_i = U * target * w_i for U units), then `match_budget` into
    [low, high] so the parameter-weighted sparsity equals the target exactly.
    Deterministic for a given generator state (consumes one Dirichlet draw)."""
    tgt = _check_target(target)
    n = _as_numel(numel)
    if not low <= tgt <= high:
        raise ValueError(f"target {tgt} must lie in [low, high] = [{low}, {high}]")
    weights = rng.dirichlet(np.ones(n.size))
    return match_budget(weights * n.size * tgt, n, tgt, low, high)
