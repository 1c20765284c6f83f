"""Pruning operators (magnitude, Wanda, SparseGPT; unstructured or N:M): weights in, keep-masks out.

The storage that applies and undoes masks on a live model (dense snapshot, packed masks, score ranks)
lives in `prune_env.pruning.snapshot`.

Masks are boolean with True = keep. Every operator removes exactly round(ratio * numel) weights of a
matrix (spread over rows for the per-row criteria), so per-layer allocations are met to the weight.
Ties are broken by position (stable sorts), so the same inputs always give the same mask.
"""

from __future__ import annotations

import torch

from ..validation import check_ratio

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): N zeros in every group of M consecutive inputs of a row."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern {pattern!r} is malformed: write it as N:M, e.g. 2:4 or 4:8") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M")
    return n, m


def _row_counts(rows: int, cols: int, ratio: float) -> torch.Tensor:
    """How many weights to remove per row so the matrix total is exactly round(ratio * rows * cols)."""
    total = round(ratio * rows * cols)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def _stable_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing the k lowest entries of each row, ties broken by position."""
    order = torch.argsort(score, dim=1, stable=True)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def _lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask removing counts[r] lowest entries of row r.

    A selection (kthvalue) finds each row's threshold, about 3x faster than sorting; rows where ties
    sit on the threshold are redone with a stable sort, so the result equals the stable-sort answer.
    """
    keep = torch.ones_like(score, dtype=torch.bool)
    cols = score.shape[1]
    counts = counts.to(score.device)
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = (counts == k).nonzero().squeeze(1)
        sub = score[rows]
        if k >= cols:
            keep[rows] = False
            continue
        threshold = sub.kthvalue(k, dim=1, keepdim=True).values
        sub_keep = sub > threshold
        tied = (~sub_keep).sum(1) != k
        if tied.any():
            sub_keep[tied] = _stable_lowest(sub[tied], k)
        keep[rows] = sub_keep
    return keep


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], False)
    return keep.reshape(rows, cols)


def score_mask(score: torch.Tensor, ratio: float, pattern: str | None = None, per_row: bool = True) -> torch.Tensor:
    """Keep-mask that removes the lowest scores: per row (Wanda), per matrix, or N:M groups."""
    nm = parse_pattern(pattern)
    if nm:
        return _nm_mask(score, *nm)
    ratio = check_ratio("sparsity", ratio)
    rows, cols = score.shape
    if per_row:
        return _lowest_per_row(score, _row_counts(rows, cols, ratio))
    flat = score.reshape(1, -1)
    return _lowest_per_row(flat, torch.tensor([round(ratio * flat.shape[1])])).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, ratio: float, pattern: str | None = None) -> torch.Tensor:
    """The baseline: smallest |W| across the whole matrix."""
    return score_mask(weight.detach().abs().float(), ratio, pattern, per_row=False)


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * act_norm.float().to(weight.device)[None, :]


def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, ratio: float, pattern: str | None = None) -> torch.Tensor:
    """Wanda: |W| * ||X_j||_2, compared within each output row."""
    return score_mask(wanda_scores(weight, act_norm), ratio, pattern, per_row=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, pattern: str | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: OBS mask selection by w^2 / [H^-1]_jj^2 with reconstruction of the kept weights.

    Returns (keep mask, updated weight). Follows Frantar & Alistarh (2023), Algorithm 1: columns are
    processed left to right in blocks, the error of each pruned column is spread over the columns to
    its right through the Cholesky factor of the inverse Hessian.
    """
    nm = parse_pattern(pattern)
    ratio = check_ratio("sparsity", ratio) if nm is None else nm[0] / nm[1]
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=W.device)
    if nm is not None and (cols % nm[1] or (cols > blocksize and blocksize % nm[1])):
        raise ValueError(f"N:M pattern {pattern!r} needs the input width ({cols}) and the block size "
                         f"({blocksize}) to be multiples of {nm[1]}: pick a pattern whose M divides both")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    total = rows * cols * ratio
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        inv_diag_sq = torch.diag(Hinv1).reshape(1, -1) ** 2
        if nm is None:  # exact count per column block, cumulative rounding keeps the matrix total exact
            score = W1 ** 2 / inv_diag_sq
            k = round(total * i2 / cols) - round(total * i1 / cols)
            prune1 = ~_lowest_per_row(score.reshape(1, -1), torch.tensor([k])).reshape(score.shape)
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # each group is chosen from the weights as already updated by the columns to its left
                group = slice(i, i + nm[1])
                prune1[:, group] = ~_nm_mask(W1[:, group] ** 2 / inv_diag_sq[:, group], *nm)
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[~keep] = 0.0
    return keep, W.to(weight.dtype)
