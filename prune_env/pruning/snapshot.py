"""Mask storage on a live model: the dense snapshot, packed keep-masks and precomputed score ranks.

`MaskedModel` applies keep-masks in place and undoes them bit-exactly; `RankedMasks` turns a ratio into
a mask with one comparison and is the one way both environments apply ranked masks (`RankedMasks.apply`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..files import cache_root
from ..models import weight_matrix
from .masking import _row_counts
from .methods import get_method


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

    def close(self) -> None:
        """Drop the bytes (close the file): the snapshot cannot restore afterwards."""
        if self._file is not None:
            self._file.close()
        self._file, self._memory = None, {}

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
        live.mul_(keep.to(device=live.device, dtype=live.dtype))
        self.masks.set(name, keep)

    @torch.no_grad()
    def restore(self, names: list[str] | None = None) -> None:
        for name in self.modules if names is None else names:
            self.dense.copy_to(name, self.modules[name].weight)
            self.masks.pop(name, None)

    def close(self) -> None:
        """Close the dense snapshot (its file): what releasing an owned context frees."""
        self.dense.close()

    def sparsity(self, name: str) -> float:
        return float((weight_matrix(self.modules[name]) == 0).float().mean())

    def zeros(self, name: str) -> int:
        return self.masks.zeros(name)


class RankedMasks:
    """Precomputed score ranks of every linear, so a mask at any ratio is one comparison.

    Used where masks must be cheap (the proxy fidelity, the iterative environment): the scores are the
    method's `rank_score` on the dense weights and the dense calibration activation norms (|W| for
    magnitude, |W| * ||X||_2 for Wanda; SparseGPT falls back to Wanda ranks because its reconstruction
    cannot be precomputed).
    """

    def __init__(self, dense: Mapping[str, torch.Tensor], method: str, act_norm: Mapping[str, torch.Tensor] | None):
        spec = get_method(method)
        self.per_row = spec.per_row
        self.ranks: dict[str, torch.Tensor] = {}
        for name, weight in dense.items():
            score = spec.rank_score(weight, act_norm[name] if act_norm is not None else None)
            score = score if self.per_row else score.reshape(1, -1)
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

    def apply(self, masked: MaskedModel, name: str, ratio: float) -> int:
        """Mask `name` at `ratio` (its lowest ranks go); ratio 0 puts its dense weights back. Returns the zeros.

        The one ranked-mask application of the package (LayerPrune's proxy fidelity, IterativePrune).
        """
        if ratio == 0:
            masked.restore([name])
            return 0
        masked.apply(name, self.keep(name, ratio))
        return masked.zeros(name)
