"""Serving: the surrogate fitted on a data set, kept per process, refused for an env it was not built for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .dataset import MATCH_KEYS, PACKAGED, SurrogateMismatchError, read_dataset
from .fit import FitConfig, Surrogate, fit

if TYPE_CHECKING:  # pragma: no cover
    from ..context import PruningContext

_LOADED: dict[tuple, Surrogate] = {}


def check_match(header: dict, description: dict, path: Path) -> None:
    """Refuse a data set built for another model, dtype, operator or data slices than the env's."""
    built = header["context"]
    wanted = json.loads(json.dumps(description))
    differ = [key for key in MATCH_KEYS if built.get(key) != wanted.get(key)]
    if differ:
        def show(d: dict) -> str:
            return ", ".join(f"{k}={json.dumps(d.get(k))[:120]}" for k in differ)
        raise SurrogateMismatchError(
            f"surrogate data set {str(path)!r} was built for {show(built)}; this env has {show(wanted)}: "
            f"build one for this env with `python -m prune_env.surrogate build --model {wanted.get('model')} "
            f"--out PATH` and pass it as surrogate=PATH")


def fitted_surrogate(path: str | Path | None, config: FitConfig = FitConfig(),
                     description: dict | None = None) -> Surrogate:
    """The surrogate fitted on the data set at `path` (None: the packaged one), kept per process; its header
    says what it was built for. With `description` (a context's `describe()`) a data set built for another
    model or data is refused before the fit (`check_match`). The fit takes milliseconds."""
    path = Path(path) if path is not None else PACKAGED
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, config)
    if key not in _LOADED:
        dataset = read_dataset(path)
        if description is not None:
            check_match(dataset.header, description, path)
        _LOADED.clear()
        _LOADED[key] = fit(dataset, config)
    surrogate = _LOADED[key]
    if description is not None:
        check_match(surrogate.header, description, path)
    return surrogate


def load_surrogate(path: str | Path | None, context: "PruningContext | dict",
                   config: FitConfig = FitConfig()) -> Surrogate:
    """The surrogate fitted on the data set at `path` (None: the packaged SmolLM2-135M one), refused with
    a clear error when the env's context (a PruningContext, a surrogate env's light `SurrogateContext`, or
    its `describe()` dict) is not what the data set was built from."""
    return fitted_surrogate(path, config, context if isinstance(context, dict) else context.describe())
