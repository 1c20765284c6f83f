"""AlphaPruning's SVD runs in float32 for model weights: it must give the float64 alphas."""

from __future__ import annotations

import pytest
import torch

from agents.alphapruning import hill_alpha


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_svd_reproduces_float64_alpha(seed: int):
    # a trained-like matrix: random bulk plus a heavy-tailed low-rank part
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 384, 144
    bulk = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.02
    u = torch.linalg.qr(torch.randn(rows, 24, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, 24, generator=gen, dtype=torch.float64))[0]
    tail = (torch.rand(24, generator=gen, dtype=torch.float64) ** -0.7) * 0.05
    weight64 = bulk + u @ torch.diag(tail) @ v.T
    assert hill_alpha(weight64.float()) == pytest.approx(hill_alpha(weight64), rel=1e-5)
    assert hill_alpha(weight64.float(), xmin_window="intended") == pytest.approx(
        hill_alpha(weight64, xmin_window="intended"), rel=1e-5)
