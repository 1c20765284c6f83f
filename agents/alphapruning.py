"""AlphaPruning (Lu et al., NeurIPS 2024): layers whose weight spectrum has a heavier power-law tail
(smaller Hill exponent alpha, i.e. better trained) are pruned less.

`hill_alpha` fits the exponent of one weight matrix's eigenvalue spectrum (the `xmin_peak` rule: xmin
searched near the peak of the log-spectrum histogram, the fit with the smallest KS distance wins);
`alphapruning_ratios` maps per-layer alphas linearly to sparsity ratios and scales them onto the budget
(the `ww_sparsity` mapping). Pure numpy/torch, no environment dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from agents.rules import MAX_RATIO, finite_vector, positive_sizes
from prune_env.validation import check_target

__all__ = ["alphapruning_ratios", "hill_alpha"]


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
    tgt = check_target(target, "target sparsity")
    a = finite_vector(alphas, "alphas")
    n = positive_sizes(numel, a.size)
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
