"""A fast, faithful stand-in for LayerPrune-v0's exact reward, fitted on exactly evaluated allocations.

The data set (one JSON line per allocation, after a header line naming the model file, the data slices,
the method and the code it was built from) is a research artefact in its own right: it is rebuilt by one
command (`make surrogate`, i.e. `python scripts/build_surrogate.py`) and versioned with what it was built
from, so a surrogate is only ever served for the model and data it describes.

    surrogate = load_surrogate(None, context.describe())      # the packaged data set, refused on mismatch
    surrogate.predict(allocation, target_sparsity)            # {"ppl", "fact_acc", "fact_nll", "fact_retention"}

The fit is ridge regression on per-unit features (a piecewise-linear basis of each unit's sparsity, so the
model learns how much each unit's pruning costs at every level) plus the global sparsity; it is pure numpy
and a prediction takes microseconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "prune-gym-surrogate"
VERSION = 1
PACKAGED = Path(__file__).resolve().parent / "surrogates" / "smollm2-135m-wanda-block.jsonl"
REBUILD = "make surrogate (python scripts/build_surrogate.py)"
MATCH_KEYS = ("model", "dtype", "granularity", "method", "pattern", "units", "text", "facts")
"""The parts of a context description a data set must share with the env it serves (device may differ)."""


class SurrogateMismatchError(ValueError):
    """The env's model or data are not the ones the surrogate's data set was built from."""


@dataclass
class Dataset:
    """A surrogate data set: its header (provenance) and one record per exactly evaluated allocation."""

    header: dict
    records: list[dict]


# --------------------------------------------------------------------------- the file format


def header_line(header: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, **header}


def read_dataset(path: str | Path) -> Dataset:
    """The header and the complete records of `path`; a last line cut short by a kill is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"surrogate data set {str(path)!r} does not exist: rebuild it with {REBUILD}")
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # a half-written last line (the writer was killed mid-append)
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"surrogate data set {str(path)!r} is empty: rebuild it with {REBUILD}")
    header = json.loads(lines[0])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} version {VERSION} data set "
                         f"(header {str(lines[0])[:80]!r}): rebuild it with {REBUILD}")
    return Dataset(header, [json.loads(line) for line in lines[1:]])


def append_record(path: str | Path, record: dict) -> None:
    """Append one record as a single write of one complete line, then fsync.

    A file whose last line was cut short (a kill mid-write) is first trimmed back to its last complete
    line, so a resumed build never glues a record onto a fragment."""
    path = Path(path)
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
    line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def start_dataset(path: str | Path, header: dict) -> Dataset:
    """Open `path` for a (resumed) build: create it with `header`, or check that the header it already
    has describes the same model, data, method and draw plan (then its records are kept)."""
    path = Path(path)
    wanted = header_line(header)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(wanted, sort_keys=True, allow_nan=False) + "\n")
        return Dataset(wanted, [])
    existing = read_dataset(path)
    for key in ("context", "model_file", "dense", "plan", "reward", "env"):
        if existing.header.get(key) != wanted.get(key):
            raise ValueError(f"{str(path)!r} was built with a different {key} ({existing.header.get(key)!r}, "
                             f"now {wanted.get(key)!r}): pass another --out or delete the file to start over")
    return existing
