"""Pruning operators (magnitude, Wanda, SparseGPT; unstructured or N:M) and reversible masking.

Masks are boolean with True = keep. Every operator removes exactly round(ratio * numel) weights of a
matrix (spread over rows for the per-row criteria), so per-layer allocations are met to the weight.
Ties are broken by position (stable sorts), so the same inputs always give the same mask.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .files import cache_root
from .models import weight_matrix

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


def check_ratio(ratio: float, what: str = "sparsity") -> float:
    ratio = float(ratio)
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what} {ratio!r} is outside [0, 1): use a fraction of weights to remove, e.g. 0.5")
    return ratio


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
    ratio = check_ratio(ratio)
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
    ratio = check_ratio(ratio) if nm is None else nm[0] / nm[1]
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


class DenseSnapshot(Mapping[str, torch.Tensor]):
    """The dense prunable weights, readable by name, for bit-exact restores.

    On CPU the bytes live in an unlinked temporary file in the cache directory: the OS page cache
    holds them, not the process (the in-memory copy cost 0.8x the fp32 model in peak RSS), and a
    restore reads straight into the live parameter with no intermediate tensor. On other devices the
    snapshot is a device copy. `snapshot[name]` is a fresh [out, in] tensor in both cases.
    """

    def __init__(self, modules: dict[str, nn.Module], on_disk: bool | None = None):
        self.modules = modules
        params = {name: m.weight for name, m in modules.items()}
        if on_disk is None:
            on_disk = all(p.device.type == "cpu" and p.is_contiguous() for p in params.values())
        self._memory: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, int] = {}
        self._file = None
        if not on_disk:
            self._memory = {name: p.detach().clone() for name, p in params.items()}
            return
        directory = cache_root()
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, prefix="dense-snapshot-")
        offset = 0
        for name, p in params.items():
            self._offsets[name] = offset
            offset += self._file.write(memoryview(_bytes(p.detach())))
        self._file.flush()

    def _read_into(self, name: str, target: torch.Tensor) -> None:
        view, offset = memoryview(_bytes(target)), self._offsets[name]
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"dense snapshot file ended early while reading {name!r}")
            done += got

    def copy_to(self, name: str, param: torch.Tensor) -> None:
        """Put the dense bytes of `name` back into its live parameter."""
        if self._file is None:
            param.copy_(self._memory[name])
        elif param.device.type == "cpu" and param.is_contiguous():
            self._read_into(name, param)
        else:
            param.copy_(self._raw(name))

    def _raw(self, name: str) -> torch.Tensor:
        if self._file is None:
            return self._memory[name].clone()
        param = self.modules[name].weight
        out = torch.empty(param.shape, dtype=param.dtype)
        self._read_into(name, out)
        return out.to(param.device)

    def __getitem__(self, name: str) -> torch.Tensor:
        raw = self._raw(name)
        return raw if isinstance(self.modules[name], nn.Linear) else raw.t()

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _bytes(tensor: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's storage (any dtype, bf16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class PackedMasks(Mapping[str, torch.Tensor]):
    """Keep-masks by module name, stored as bits (a bool tensor per weight would cost 0.2x the fp32 model).

    `masks[name]` unpacks a fresh bool tensor on the mask's device; removed-weight counts are kept
    alongside, so sparsity bookkeeping never unpacks.
    """

    def __init__(self):
        self._bits: dict[str, tuple[np.ndarray, tuple[int, ...], torch.device]] = {}
        self._zeros: dict[str, int] = {}

    def set(self, name: str, keep: torch.Tensor) -> None:
        flat = keep.detach().reshape(-1).cpu().numpy()
        self._bits[name] = (np.packbits(flat), tuple(keep.shape), keep.device)
        self._zeros[name] = int(flat.size - np.count_nonzero(flat))

    def pop(self, name: str, default=None):
        self._zeros.pop(name, None)
        return self._bits.pop(name, default)

    def zeros(self, name: str) -> int:
        return self._zeros.get(name, 0)

    def __getitem__(self, name: str) -> torch.Tensor:
        bits, shape, device = self._bits[name]
        flat = np.unpackbits(bits, count=math.prod(shape)).astype(bool)
        return torch.from_numpy(flat).reshape(shape).to(device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)


class MaskedModel:
    """Dense snapshot of the prunable weights, so any mask can be undone bit-exactly.

    Masks are applied in place on the live weights (no copies of the model); restore() copies the
    snapshot back.
    """

    def __init__(self, modules: dict[str, nn.Module], snapshot_on_disk: bool | None = None):
        self.modules = modules
        self.dense = DenseSnapshot(modules, snapshot_on_disk)
        self.masks = PackedMasks()

    @torch.no_grad()
    def apply(self, name: str, keep: torch.Tensor, new_weight: torch.Tensor | None = None) -> None:
        live = weight_matrix(self.modules[name])
        if new_weight is None:
            self.dense.copy_to(name, self.modules[name].weight)
        else:
            live.copy_(new_weight)
        live.mul_(keep.to(live.dtype))
        self.masks.set(name, keep)

    @torch.no_grad()
    def restore(self, names: list[str] | None = None) -> None:
        for name in self.modules if names is None else names:
            self.dense.copy_to(name, self.modules[name].weight)
            self.masks.pop(name, None)

    def sparsity(self, name: str) -> float:
        return float((weight_matrix(self.modules[name]) == 0).float().mean())

    def zeros(self, name: str) -> int:
        return self.masks.zeros(name)


class RankedMasks:
    """Precomputed score ranks of every linear, so a mask at any ratio is one comparison.

    Used where masks must be cheap (the proxy fidelity, the iterative environment): the scores are
    fixed (|W| for magnitude, |W| * ||X||_2 from the dense model's calibration for Wanda; SparseGPT
    falls back to Wanda ranks here because its reconstruction cannot be precomputed).
    """

    def __init__(self, dense: dict[str, torch.Tensor], method: str, act_norm: dict[str, torch.Tensor] | None):
        self.per_row = method != "magnitude"
        self.ranks: dict[str, torch.Tensor] = {}
        for name, weight in dense.items():
            score = wanda_scores(weight, act_norm[name]) if self.per_row else weight.abs().float().reshape(1, -1)
            order = torch.argsort(score, dim=1, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order).contiguous())
            dtype = torch.int16 if score.shape[1] < 2 ** 15 else torch.int32
            self.ranks[name] = ranks.to(dtype)
        self.shapes = {name: tuple(weight.shape) for name, weight in dense.items()}

    def keep(self, name: str, ratio: float) -> torch.Tensor:
        rows, cols = self.shapes[name]
        ranks = self.ranks[name]
        counts = _row_counts(rows, cols, ratio) if self.per_row else torch.tensor([round(ratio * rows * cols)])
        return (ranks >= counts.to(device=ranks.device, dtype=ranks.dtype)[:, None]).reshape(rows, cols)
