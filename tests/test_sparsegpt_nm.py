"""SparseGPT N:M against an independent, column-by-column reading of Algorithm 1 (Frantar & Alistarh, 2023).

The reference below has no blocking and works in float64: for every group of M columns it scores the
weights AS ALREADY UPDATED by the error compensation of the columns to its left, w^2 / [H^-1]_jj^2, prunes
the N smallest per row, then prunes column by column and spreads each column's error to the right
through the upper Cholesky factor of the inverse Hessian.
"""

from __future__ import annotations

import pytest
import torch

from prune_env.pruning.masking import sparsegpt_prune


def reference_sparsegpt_nm(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int,
                           percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    W = weight.double().clone()
    H = hessian.double().clone()
    cols = W.shape[1]
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            score = W[:, j:j + m] ** 2 / U.diagonal()[j:j + m] ** 2
            lowest = torch.argsort(score, dim=1, stable=True)[:, :n]
            keep[:, j:j + m].scatter_(1, lowest, False)
        pruned = torch.where(keep[:, j], W[:, j], torch.zeros_like(W[:, j]))
        err = (W[:, j] - pruned) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        W[:, j] = pruned
    return keep, W


def random_layer(rows: int, cols: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer and a positive-definite Hessian 2 X^T X from correlated inputs (so compensation matters)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols) + mixing)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return weight, 2.0 * x.T @ x, x


def layer_error(dense: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (dense - pruned.double()).T) ** 2).sum())


@pytest.mark.parametrize("pattern,seed", [("2:4", 0), ("2:4", 1), ("4:8", 2), ("1:4", 3)])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_nm_masks_match_column_by_column_reference(pattern: str, seed: int, blocksize: int):
    n, m = (int(v) for v in pattern.split(":"))
    weight, hess, x = random_layer(rows=24, cols=64, samples=256, seed=seed)
    ref_keep, ref_weight = reference_sparsegpt_nm(weight, hess, n, m)
    keep, new = sparsegpt_prune(weight.float(), hess.float(), 0.0, pattern, blocksize=blocksize)
    assert torch.equal(keep, ref_keep)
    assert torch.all(new[~keep] == 0)
    ours, theirs = layer_error(weight, new, x), layer_error(weight, ref_weight, x)
    assert ours <= theirs * (1 + 1e-4)


def test_nm_masks_come_from_updated_weights_not_block_start():
    """Scoring every group from the block's initial weights (the old behaviour) gives a different mask here."""
    n, m = 2, 4
    weight, hess, _ = random_layer(rows=24, cols=64, samples=256, seed=5)
    W = weight.clone()
    H = hess + 0.01 * hess.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    stale = (W ** 2 / U.diagonal() ** 2).reshape(24, -1, m)
    stale_keep = torch.ones_like(stale, dtype=torch.bool)
    stale_keep.scatter_(-1, torch.argsort(stale, dim=-1, stable=True)[..., :n], False)
    keep, _ = sparsegpt_prune(weight.float(), hess.float(), 0.0, "2:4", blocksize=64)
    assert not torch.equal(keep, stale_keep.reshape(24, 64))


def test_nm_refuses_block_size_not_multiple_of_m():
    weight, hess, _ = random_layer(rows=4, cols=64, samples=128, seed=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        sparsegpt_prune(weight.float(), hess.float(), 0.0, "4:8", blocksize=20)
