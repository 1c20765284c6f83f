"""The one home of value checks: numbers, ratios, targets, choices, devices and dtypes.

Every entry point (env constructors, the CLIs, train.py, benchmark.py, agents) checks its inputs with
these, so a bad value gets the same kind of message wherever it enters: the name, the value, what is
allowed. They raise `ValueError` (the CLIs turn it into one line and exit status 2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_HINT = "use 'cpu', 'cuda', 'cuda:N' (an index this machine has), 'mps' or 'auto'"


def is_int(value: Any) -> bool:
    """An integer (Python or numpy) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (Python or numpy) that is not a bool and not NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def is_finite_number(value: Any) -> bool:
    """A real number (Python or numpy) that is not a bool and is finite."""
    return is_number(value) and math.isfinite(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """`value` as an int (integer=True) or float inside the interval; else ValueError naming both.

    Strings, bools, complex numbers and NaN are refused, never coerced ("0.5" is not a number here).
    """
    kind = "an integer" if integer else "a number"
    ok = is_int(value) if integer else is_finite_number(value)
    if not ok:
        where = _interval(low, high, low_open, high_open)
        raise ValueError(f"{name}={value!r} is not {kind}: give {kind} in {where}")
    number = int(value) if integer else float(value)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise ValueError(f"{name}={value!r} is outside the allowed range {_interval(low, high, low_open, high_open)}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """A true/false switch; 1, "yes" and the like are refused, never coerced."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a boolean: give true or false")
    return value


def check_ratio(name: str, value: Any) -> float:
    """A sparsity ratio: the fraction of weights to remove, in [0, 1)."""
    return float(check_number(name, value, low=0.0, high=1.0, high_open=True))


def check_target(value: Any, name: str = "target_sparsity") -> float:
    """A global target sparsity, in (0, 1)."""
    return float(check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True))


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`; else ValueError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return value


def check_dtype(dtype: Any) -> str:
    return check_choice("dtype", dtype, DTYPE_NAMES)


def check_device(device: Any) -> str:
    """A torch device this machine has ('auto' picks CUDA when present); else ValueError saying what to use."""
    import torch

    if not isinstance(device, str) or not device:
        raise ValueError(f"device={device!r} is not a device name: {DEVICE_HINT}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device torch knows: {DEVICE_HINT}") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available here: use device=cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"device={device!r} is not available on this machine: {DEVICE_HINT}")
