"""Allocations (one sparsity per unit): parsing user files and the AMC-style budget wall."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..models import LinearRef
from ..validation import check_ratio


def _check_values(values: list, where: str) -> list[float]:
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: entry {i} is {value!r}, not a number")
        out.append(check_ratio(f"{where}: entry {i} sparsity", value))
    return out


def parse_allocation(data, refs: list[LinearRef], where: str = "allocation") -> dict[str, float]:
    """Per-linear ratios from a list (per block or per linear, by its length) or a {name: ratio} map.

    Map keys may be full linear names ("model.layers.3.mlp.up_proj") or blocks ("block.3").
    A result record ({"allocation": [...], "granularity": ...}) is accepted too.
    """
    n_blocks = len({ref.block_index for ref in refs})
    if isinstance(data, dict) and "allocation" in data:
        data = data["allocation"]
    if isinstance(data, list):
        values = _check_values(data, where)
        if len(values) == n_blocks:
            return {ref.name: values[ref.block_index] for ref in refs}
        if len(values) == len(refs):
            return {ref.name: value for ref, value in zip(refs, values)}
        raise ValueError(f"{where} has {len(values)} ratios: give one per decoder block ({n_blocks}) "
                         f"or one per linear layer ({len(refs)})")
    if isinstance(data, dict):
        names = {ref.name for ref in refs}
        blocks = {f"block.{b}" for b in range(n_blocks)}
        unknown = sorted(set(data) - names - blocks)
        if unknown:
            raise ValueError(f"{where} names unknown layer(s) {unknown[:5]}: use linear names such as "
                             f"{refs[0].name!r} or block names such as 'block.0'")
        ratios = {}
        for key, value in data.items():
            (value,) = _check_values([value], f"{where}[{key!r}]")
            targets = [r.name for r in refs if f"block.{r.block_index}" == key] if key in blocks else [key]
            ratios.update({name: value for name in targets})
        return ratios
    raise ValueError(f"{where} must be a JSON list of ratios or an object mapping layer names to ratios")


def load_allocation(path: str | Path, refs: list[LinearRef]) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"allocation file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"allocation file {str(path)!r} is not UTF-8 JSON text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"allocation file {str(path)!r} is not valid JSON: {error}") from None
    return parse_allocation(data, refs, where=f"allocation file {str(path)!r}")


def wall_bounds(target_zeros: float, pruned: float, numel: int, remaining: int, low: float,
                high: float) -> tuple[float, float]:
    """Feasible ratio interval for the current unit so the final budget can still be met exactly.

    With `pruned` weights already removed and `remaining` weights still to decide after this unit
    (each of them able to take a ratio in [low, high]), the current ratio must leave the rest able
    to make up the difference (He et al. 2018, AMC's action wall).
    """
    need = target_zeros - pruned
    lower = (need - remaining * high) / numel
    upper = (need - remaining * low) / numel
    return max(low, lower), min(high, upper)


def project(ratio: float, bounds: tuple[float, float]) -> float:
    if math.isnan(ratio):
        raise ValueError("ratio is NaN")
    lo, hi = bounds
    return min(max(ratio, lo), hi) if lo <= hi else lo
