"""A tiny surrogate data set: six random exact episodes of tiny-llama, for tests of the surrogate fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prune_env.envs.layer import LayerPruneEnv
from prune_env.surrogate import append_record, start_dataset


def write_tiny_dataset(path: Path, data: dict, knowledge: bool = False) -> LayerPruneEnv:
    """Write the data set at path and return the exact env that played it; with `knowledge`, each record also
    keeps the env's balanced knowledge metrics (as `python -m prune_env.surrogate build` does)."""
    exact = LayerPruneEnv(model="tiny-llama", data=data)
    start_dataset(path, {"context": exact.context.describe(), "dense": exact.context.dense.as_dict(),
                         "unit_numel": [u.numel for u in exact.units]})
    rng = np.random.default_rng(0)
    for _ in range(6):
        exact.reset(seed=0)
        for value in rng.random(len(exact.units)):
            *_, info = exact.step(np.array([value], dtype=np.float32))
        keys = ("allocation", "ppl", "fact_acc", "fact_nll", "fact_retention")
        keys += ("fact_retention_balanced", "fact_acc_balanced") if knowledge else ()
        append_record(path, {key: info[key] for key in keys})
    return exact
