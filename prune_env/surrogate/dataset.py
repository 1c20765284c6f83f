"""The surrogate's data set: one JSON line per exactly evaluated allocation after a header line that names
the model file, the data slices, the method and the code it was built from (so a surrogate is only ever
served for the model and data it describes). Reading checks every line (`file:line: ...` errors); appending
is one fsynced write of one complete line, so a killed build resumes where it stopped.

Knowledge (issue #26): records of newer builds also carry the pruned model's per-fact flags on the env's
facts (`fact_greedy_exact`, `fact_correct`: hex bitmasks, bit i = fact i) with `fact_retention_balanced`
and `fact_acc_balanced`; the header's `fact_set` holds each fact's (relation, answer) and the dense model's
flags, so any knowledge metric can be recomputed later from the file alone (`knowledge_of`). Records
without them (the first builds) stay valid.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write_text
from ..data.knowledge import BalancedIndex
from ..envs.rewards import KNOWLEDGE_METRICS, LOWER_IS_BETTER, RewardConfig
from ..validation import is_finite_number, is_int

FORMAT = "prune-gym-surrogate"
VERSION = 1
PACKAGED = Path(__file__).resolve().parent / "data" / "smollm2-135m-wanda-block.jsonl"
REBUILD = "make surrogate (python -m prune_env.surrogate build)"
MATCH_KEYS = ("model", "dtype", "granularity", "method", "pattern", "units", "text", "facts")
"""The parts of a context description a data set must share with the env it serves (device may differ)."""


class SurrogateMismatchError(ValueError):
    """The env's model or data are not the ones the surrogate's data set was built from."""


class SurrogateDataError(ValueError):
    """A data set line that cannot be used (not JSON, a field missing, of the wrong type, NaN): `file:line: ...`."""


@dataclass
class Dataset:
    """A surrogate data set: its header (provenance) and one record per exactly evaluated allocation."""

    header: dict
    records: list[dict]
    path: Path | None = None  # where it was read from (named in errors)


# --------------------------------------------------------------------------- the file format


def header_line(header: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, **header}


def read_dataset(path: str | Path) -> Dataset:
    """The header and the complete records of `path`; a last line cut short by a kill is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"surrogate data set {str(path)!r} does not exist: rebuild it with {REBUILD}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurrogateDataError(f"{path}: not UTF-8 text: give a data set written by {REBUILD}") from None
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # a half-written last line (the writer was killed mid-append)
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line]
    if not numbered:
        raise ValueError(f"surrogate data set {str(path)!r} is empty: rebuild it with {REBUILD}")
    header = _parse_line(path, *numbered[0])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} version {VERSION} data set "
                         f"(header {str(numbered[0][1])[:80]!r}): rebuild it with {REBUILD}")
    units = _check_header(header, f"{path}:{numbered[0][0]}")
    n_facts = _check_fact_set(header, f"{path}:{numbered[0][0]}")
    records = []
    for number, line in numbered[1:]:
        records.append(_parse_line(path, number, line))
        if units is None and "allocation" in records[-1]:
            raise SurrogateDataError(f"{path}:{number}: a record with an allocation, but the header has no "
                                     f"'unit_numel': rebuild the data set with {REBUILD}")
        _check_record(records[-1], units, f"{path}:{number}")
        _check_flags(records[-1], n_facts, f"{path}:{number}")
    return Dataset(header, records, path)


RECORD_METRICS = ("ppl", "fact_acc", "fact_nll", "fact_retention")
"""What each record carries (with its allocation) once the header gives the unit sizes: what the fit regresses.
A perplexity-only record (`"perplexity_only": true`, joined by `merge --perplexity-from`) carries ppl alone."""
RECORD_NUMBERS = ("target", "quality", "achieved_sparsity", "seconds")
"""Optional record fields that must be finite numbers when present (the k-fold figures and reports read them)."""
KNOWLEDGE = KNOWLEDGE_METRICS
"""Optional record metrics (answer-balanced, prune_env/data/knowledge.py; the ones a knowledge reward can read):
fitted on the records that carry them, when 3 or more do."""
FLAGS = ("fact_greedy_exact", "fact_correct")
"""Optional per-fact flags of a record (hex bitmasks over the header's `fact_set`): knowledge recomputable."""


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise SurrogateDataError(f"{path}:{number}: not JSON ({str(error)[:80]}): remove the line or rebuild "
                                 f"with {REBUILD}") from None
    if not isinstance(value, dict):
        raise SurrogateDataError(f"{path}:{number}: a {type(value).__name__}, not a JSON object: remove the line "
                                 f"or rebuild with {REBUILD}")
    return value


def _bad(where: str, field: str, value, wanted: str) -> SurrogateDataError:
    problem = ("is missing" if value is None else "is NaN" if isinstance(value, float) and value != value
               else f"is {json.dumps(value)[:60]}, not {wanted}")
    return SurrogateDataError(f"{where}: field {field!r} {problem}: fix or remove the line, or rebuild with {REBUILD}")


def _numbers(where: str, field: str, values, length: int | None = None, positive: bool = False) -> None:
    """`values`: a list of finite numbers (of `length` entries, each > 0 if `positive`)."""
    if not isinstance(values, list) or (length is not None and len(values) != length) or not values:
        wanted = f"a list of {length} numbers (one per unit)" if length else "a non-empty list of numbers"
        raise _bad(where, field, values, wanted)
    for i, value in enumerate(values):
        if not is_finite_number(value) or (positive and value <= 0):
            raise _bad(where, f"{field}[{i}]", value, "a positive number" if positive else "a finite number")


def _check_header(header: dict, where: str) -> int | None:
    """The header's fields that the fit and the env read; returns the number of units (None: not given)."""
    if not isinstance(header.get("context"), dict):
        raise _bad(where, "context", header.get("context"), "a mapping (the env description it was built for)")
    units = None
    if "unit_numel" in header:
        _numbers(where, "unit_numel", header["unit_numel"], positive=True)
        units = len(header["unit_numel"])
    dense = header.get("dense")
    if dense is not None or units is not None:
        if not isinstance(dense, dict):
            raise _bad(where, "dense", dense, "a mapping of the dense model's metrics")
        for key in ("ppl", "fact_acc") if units is not None else ():
            if key not in dense:
                raise _bad(where, f"dense.{key}", None, "a number")
        for key, value in dense.items():
            if key == "retention_by_relation":  # per-relation detail (knowledge.py), not regressed
                continue
            if not is_finite_number(value) or (key == "ppl" and value <= 0):
                raise _bad(where, f"dense.{key}", value, "a positive number" if key == "ppl" else "a finite number")
    if header.get("profile") is not None:
        if not isinstance(header["profile"], dict):
            raise _bad(where, "profile", header["profile"], "a mapping")
        for key in ("z_wanda", "z_grad"):
            _numbers(where, f"profile.{key}", header["profile"].get(key), units)
    if "reward" in header:
        if not isinstance(header["reward"], dict):
            raise _bad(where, "reward", header["reward"], "a mapping (the reward config)")
        for key in ("ppl_weight", "fact_weight"):  # what the k-fold figures and the spread read
            if key in header["reward"] and not is_finite_number(header["reward"][key]):
                raise _bad(where, f"reward.{key}", header["reward"][key], "a finite number")
    return units


def _check_record(record: dict, units: int | None, where: str) -> None:
    """One record: the fit's fields required when the header gives `units` (None: unknown, as when appending);
    every known field present is typed and finite."""
    if "draw" in record and (not is_int(record["draw"]) or record["draw"] < 0):
        raise _bad(where, "draw", record["draw"], "a draw number (an integer >= 0)")
    if units is not None or "allocation" in record:
        _numbers(where, "allocation", record.get("allocation"), units)
        if not all(0.0 <= value <= 1.0 for value in record["allocation"]):
            raise _bad(where, "allocation", record["allocation"], "ratios in [0, 1]")
    required = ("ppl",) if record.get("perplexity_only") is True else RECORD_METRICS
    for key in RECORD_METRICS + RECORD_NUMBERS + KNOWLEDGE:
        if key in record or (units is not None and key in required):
            value = record.get(key)
            positive = key == "ppl" or key in LOWER_IS_BETTER
            if not is_finite_number(value) or (positive and value <= 0):
                raise _bad(where, key, value, "a positive number" if positive else "a finite number")


def pack_flags(flags) -> str:
    """Per-fact booleans as a hex bitmask (bit i = fact i; one hex digit per 4 facts): compact and exact."""
    value = sum(1 << i for i, flag in enumerate(flags) if flag)
    return format(value, "x").zfill((len(flags) + 3) // 4)


def unpack_flags(text: str, n: int) -> np.ndarray:
    """The n booleans of `pack_flags`."""
    value = int(text, 16)
    return np.asarray([(value >> i) & 1 for i in range(n)], dtype=bool)


def _hex_flags(where: str, field: str, value, n: int | None) -> None:
    digits = None if n is None else (n + 3) // 4
    ok = isinstance(value, str) and re.fullmatch("[0-9a-f]+", value) is not None
    ok = ok and (n is None or (len(value) == digits and int(value, 16) < (1 << n)))
    if not ok:
        wanted = "a hex bitmask" + ("" if n is None else f" of {digits} digits (one bit per fact of the header's fact_set)")
        raise _bad(where, field, value, wanted)


def _check_fact_set(header: dict, where: str) -> int | None:
    """The header's `fact_set` (each fact's relation and answer, the dense model's flags): its fact count."""
    facts = header.get("fact_set")
    if facts is None:
        return None
    labels = facts.get("labels") if isinstance(facts, dict) else None
    if not isinstance(labels, list) or not labels or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in labels):
        raise _bad(where, "fact_set.labels", labels, "a list of [relation, answer] pairs, one per fact")
    for key in FLAGS:
        _hex_flags(where, f"fact_set.{key}", facts.get(key), len(labels))
    return len(labels)


def _check_flags(record: dict, n_facts: int | None, where: str, appending: bool = False) -> None:
    """A record's per-fact flags, when present: hex bitmasks of the header's fact count, which the header must
    give (when `appending`, the header is not read: only the form is checked)."""
    present = [key for key in FLAGS if key in record]
    if not present:
        return
    if len(present) != len(FLAGS):
        raise _bad(where, [k for k in FLAGS if k not in present][0], None, "a hex bitmask (with its pair)")
    if n_facts is None and not appending:
        raise SurrogateDataError(f"{where}: per-fact flags, but the header has no 'fact_set' to read them "
                                 f"against: rebuild the data set with {REBUILD}")
    for key in FLAGS:
        _hex_flags(where, key, record[key], n_facts)


def knowledge_of(header: dict, record: dict) -> dict[str, float]:
    """Balanced retention and accuracy of a record, recomputed from its per-fact flags and the header's
    `fact_set` with prune_env/knowledge.py's code (what the env reported, within float rounding)."""
    facts = header["fact_set"]
    n = len(facts["labels"])
    index = BalancedIndex.of([r for r, _ in facts["labels"]], [a for _, a in facts["labels"]])
    dense_known = unpack_flags(facts["fact_greedy_exact"], n)
    retention, _ = index.means(unpack_flags(record["fact_greedy_exact"], n), dense_known)
    accuracy, _ = index.means(unpack_flags(record["fact_correct"], n), np.ones(n, bool))
    # as `PruningContext.metrics` reports it: a dense model that knows no fact gives a pruned one 0, not NaN
    return {"fact_retention_balanced": 0.0 if np.isnan(retention) else float(retention),
            "fact_acc_balanced": float(accuracy)}


def append_record(path: str | Path, record: dict) -> None:
    """Append one record as a single write of one complete line, then fsync.

    A file whose last line was cut short (a kill mid-write) is first trimmed back to its last complete
    line, so a resumed build never glues a record onto a fragment."""
    path = Path(path)
    _check_record(record, None, f"{path} (new record)")
    _check_flags(record, None, f"{path} (new record)", appending=True)
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


def _same(key: str, old, new) -> bool:
    """Header entries agree; rewards are compared as RewardConfigs, so a key added to RewardConfig later
    (with its default) does not make an old data set unresumable."""
    if key == "reward" and isinstance(old, dict) and isinstance(new, dict):
        return RewardConfig.from_dict(old) == RewardConfig.from_dict(new)
    if key == "fact_set" and isinstance(old, dict) and isinstance(new, dict):
        # the facts themselves: the dense flags are rescored at each start, where another thread count may
        # flip a near-tied choice; records keep reading against the file's own header
        return old.get("labels") == new.get("labels")
    return old == new


def start_dataset(path: str | Path, header: dict) -> Dataset:
    """Open `path` for a (resumed) build: create it with `header`, or check that the header it already
    has describes the same model, data, method and draw plan (then its records are kept)."""
    path = Path(path)
    wanted = header_line(header)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(wanted, sort_keys=True, allow_nan=False) + "\n")
        return Dataset(wanted, [], path)
    existing = read_dataset(path)
    for key in ("context", "model_file", "dense", "plan", "reward", "env", "fact_set"):
        if not _same(key, existing.header.get(key), wanted.get(key)):
            raise ValueError(f"{str(path)!r} was built with a different {key} ({existing.header.get(key)!r}, "
                             f"now {wanted.get(key)!r}): pass another --out or delete the file to start over")
    return existing


PERPLEXITY_KEYS = tuple(key for key in MATCH_KEYS if key != "facts")
"""What a data set lending its perplexities must share with the one it joins: MATCH_KEYS but the facts."""
PERPLEXITY_RECORD = ("draw", "target", "kind", "variant", "params", "allocation", "requested", "achieved_sparsity",
                     "seconds", "commit")
"""The fields a perplexity-only record keeps from its lender (with its ppl, on the joined set's dense scale)."""


VISITED_DRAWS = 1_000_000
"""Draw numbers of re-anchoring (`visited`) records start here: never a planned draw's number."""


def _same_draw(records: dict[int, dict], record: dict, path: Path, displaced: list[dict]) -> bool:
    """Whether `record` may take its draw number in `records`. A planned draw is one allocation in every file
    of one plan (a different one is a corrupt file); a visited record's number only orders its own file, so
    two files' visited records under one number are two records: the newcomer is renumbered (`displaced`)."""
    held = records.get(record["draw"])
    if held is None or held["allocation"] == record["allocation"]:
        return True
    if "visited" in (held.get("kind"), record.get("kind")):
        displaced.append(record)
        return False
    raise ValueError(f"{str(path)!r} has draw {record['draw']} with another allocation than the file before it: "
                     "they were not built from one plan, so they cannot be merged")


def merge(shards: list[Path], out: Path, perplexity_from: list[Path] = ()) -> int:
    """Join shard files built with one header (model, data, plan) into one data set ordered by draw.

    `perplexity_from`: data sets of the same model, text, method and units but other facts (e.g. the packaged
    one), whose draws the shards lack join as perplexity-only records: their allocation and ppl, not their fact
    metrics, which are for other facts. A draw in both is the shards' record (same plan seed, same allocation)."""
    first = read_dataset(shards[0])
    records, displaced = {r["draw"]: r for r in first.records}, []
    for path in shards[1:]:
        other = read_dataset(path)
        for key in ("context", "model_file", "dense", "plan", "reward", "env", "fact_set"):
            if other.header.get(key) != first.header.get(key):
                raise ValueError(f"{str(path)!r} was built with a different {key} than {str(shards[0])!r}: "
                                 f"only shards of one build can be merged")
        for record in other.records:
            if _same_draw(records, record, path, displaced):
                records[record["draw"]] = record
    for path in perplexity_from:
        lender = read_dataset(path)
        for key in PERPLEXITY_KEYS:
            if lender.header["context"].get(key) != first.header["context"].get(key):
                raise ValueError(f"{str(path)!r} was built with a different {key} than {str(shards[0])!r}: only a "
                                 f"data set of the same model, text, method and units can lend its perplexities")
        dense = lender.header["dense"]["ppl"], first.header["dense"]["ppl"]
        if abs(dense[0] / dense[1] - 1.0) > 0.01:
            raise ValueError(f"{str(path)!r} measured the dense perplexity {dense[0]:.3f}, {str(shards[0])!r} "
                             f"{dense[1]:.3f}: the evaluation differs, so its perplexities cannot join")
        for record in lender.records:
            lent = {key: record[key] for key in PERPLEXITY_RECORD if key in record} | {
                "perplexity_only": True, "ppl": record["ppl"] * (dense[1] / dense[0])}
            if not _same_draw(records, lent, path, displaced):
                continue
            if record["draw"] not in records:  # a draw in both is the shards' own record
                records[record["draw"]] = lent
    fresh = max([VISITED_DRAWS - 1, *records]) + 1
    for offset, record in enumerate(displaced):
        records[fresh + offset] = {**record, "draw": fresh + offset}
    header = {k: v for k, v in first.header.items() if k not in ("format", "version")}
    if perplexity_from:
        header["perplexity_from"] = [str(path) for path in perplexity_from]
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: merge into a new file")
    start_dataset(out, header)
    for draw in sorted(records):
        append_record(out, records[draw])
    return len(records)
