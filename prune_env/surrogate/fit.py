"""A fast, faithful stand-in for LayerPrune-v0's exact reward, fitted on exactly evaluated allocations.

The data set (one JSON line per allocation, after a header line naming the model file, the data slices,
the method and the code it was built from) is a research artefact in its own right: it is rebuilt by one
command (`make surrogate`, i.e. `python scripts/build_surrogate.py`) and versioned with what it was built
from, so a surrogate is only ever served for the model and data it describes.

    surrogate = load_surrogate(None, context)                 # the packaged data set, refused on mismatch
    surrogate.predict(allocation, target_sparsity)            # {"ppl", "fact_acc", "fact_nll", "fact_retention"}

The fit is ridge regression of log1p(log ppl ratio) and the fact metrics on a low-dimensional description
of the allocation: the level of the damage (powers of the budget, hinges of the sparsity shared by all
units), its shape (tilt along depth and along the dense profile's z-scores, spread, the end units) and
per-unit terms whose weight the fit chooses by leave-one-out error, so the per-unit detail grows with the
data. It is refitted at load from the data set (milliseconds), pure numpy, ~0.1 ms a prediction.
`heldout` gives the k-fold figures (Spearman of predicted vs exact reward, overall and per target; bias).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import atomic_write_text
from .rewards import RewardConfig
from .validation import is_finite_number, is_int

if TYPE_CHECKING:  # pragma: no cover
    from .context import PruningContext

FORMAT = "prune-gym-surrogate"
VERSION = 1
PACKAGED = Path(__file__).resolve().parent / "surrogates" / "smollm2-135m-wanda-block.jsonl"
REBUILD = "make surrogate (python scripts/build_surrogate.py)"
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
    records = []
    for number, line in numbered[1:]:
        records.append(_parse_line(path, number, line))
        if units is None and "allocation" in records[-1]:
            raise SurrogateDataError(f"{path}:{number}: a record with an allocation, but the header has no "
                                     f"'unit_numel': rebuild the data set with {REBUILD}")
        _check_record(records[-1], units, f"{path}:{number}")
    return Dataset(header, records)


RECORD_METRICS = ("ppl", "fact_acc", "fact_nll", "fact_retention")
"""What each record carries (with its allocation) once the header gives the unit sizes: what the fit regresses."""
RECORD_NUMBERS = ("target", "quality", "achieved_sparsity", "seconds")
"""Optional record fields that must be finite numbers when present (held-out figures and reports read them)."""


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
        for key in ("ppl_weight", "fact_weight"):  # what the held-out figures and the spread read
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
    for key in RECORD_METRICS + RECORD_NUMBERS:
        if key in record or (units is not None and key in RECORD_METRICS):
            value = record.get(key)
            if not is_finite_number(value) or (key == "ppl" and value <= 0):
                raise _bad(where, key, value, "a positive number" if key == "ppl" else "a finite number")


def append_record(path: str | Path, record: dict) -> None:
    """Append one record as a single write of one complete line, then fsync.

    A file whose last line was cut short (a kill mid-write) is first trimmed back to its last complete
    line, so a resumed build never glues a record onto a fragment."""
    path = Path(path)
    _check_record(record, None, f"{path} (new record)")
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
    return old == new


def start_dataset(path: str | Path, header: dict) -> Dataset:
    """Open `path` for a (resumed) build: create it with `header`, or check that the header it already
    has describes the same model, data, method and draw plan (then its records are kept)."""
    path = Path(path)
    wanted = header_line(header)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(wanted, sort_keys=True, allow_nan=False) + "\n")
        return Dataset(wanted, [])
    existing = read_dataset(path)
    for key in ("context", "model_file", "dense", "plan", "reward", "env"):
        if not _same(key, existing.header.get(key), wanted.get(key)):
            raise ValueError(f"{str(path)!r} was built with a different {key} ({existing.header.get(key)!r}, "
                             f"now {wanted.get(key)!r}): pass another --out or delete the file to start over")
    return existing


# --------------------------------------------------------------------------- the fit

TARGETS = ("log_ppl_ratio", "fact_acc", "fact_nll", "fact_retention")
"""What is regressed: log(ppl / ppl_dense) (ppl spans orders of magnitude), and the fact metrics as they are."""


@dataclass(frozen=True)
class FitConfig:
    """Ridge regression on a low-dimensional description of an allocation; the penalty is chosen per metric
    by exact leave-one-out error over `penalties` (closed form for ridge: deterministic and fast)."""

    knots: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)
    unit_linear: bool = True  # per-unit s: each unit's own first-order cost
    unit_knots: tuple[float, ...] = (0.3, 0.5, 0.7)  # per-unit max(0, s - k): each unit's own convex cost
    profile_terms: bool = True  # the allocation's tilt along the dense profile's z-scores, when the header has them
    compress_ppl: bool = True  # regress log1p(log(ppl / ppl_dense)): a collapsed model (ppl x 300) must not
    #                             dominate the squared loss over the many allocations a policy actually visits
    penalties: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    unit_scales: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    """Candidate weights of the per-unit columns against the shared ones (a stronger prior towards "every unit
    alike" when small); chosen per metric by leave-one-out error with the penalty, so the fit itself decides
    how much per-unit detail the data support (0: none)."""


def linear_map(config: FitConfig, numel: np.ndarray, profile: np.ndarray | None) -> np.ndarray:
    """(n_units, k): the features that are linear in the allocation, as one matrix (so a prediction is a
    handful of numpy calls). With d = s - t the deviation from the budget t (parameter-weighted mean):
    d projected on depth and depth^2, d of the first and last unit and mean d of the first and last three,
    d projected on the dense z-scores of Wanda scores and gradients (profile_terms, when the data set's header
    records the profile: `build_surrogate.py` always does), then s itself
    (unit_linear: each unit's own cost)."""
    n = numel.size
    weights = numel / numel.sum()
    deviation = np.eye(n) - weights[None, :]  # d = deviation @ s
    depth = np.linspace(0.0, 1.0, n)
    ends = np.zeros((4, n))
    ends[0, 0], ends[1, -1], ends[2, :3], ends[3, -3:] = 1.0, 1.0, 1.0 / min(3, n), 1.0 / min(3, n)
    rows = [depth / n, depth ** 2 / n, *ends]
    if config.profile_terms and profile is not None:
        rows.extend(profile / n)
    columns = [deviation.T @ np.asarray(rows).T]
    if config.unit_linear:
        columns.append(np.eye(n))
    return np.concatenate(columns, axis=1)


def features(allocations, config: FitConfig, numel: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """(m, n_units) allocations -> (m, n_features): the level of the damage (t^2, t^3, the weighted mean
    of max(0, s - k) per knot: the shared convex cost, the mean squared deviation from t), then the
    shape terms of `linear_map`, then per-unit hinges max(0, s - k) for k in unit_knots."""
    s = np.atleast_2d(np.asarray(allocations, dtype=np.float64))
    weights = numel / numel.sum()
    t = s @ weights
    hinges = np.maximum(s[:, :, None] - np.asarray(config.knots), 0.0)  # (m, n, knots)
    level = np.column_stack([t ** 2, t ** 3, np.einsum("mnk,n->mk", hinges, weights), (s - t[:, None]) ** 2 @ weights])
    columns = [level, s @ linear]
    columns.extend(np.maximum(s - k, 0.0) for k in config.unit_knots)
    return np.concatenate(columns, axis=1)


def _ridge(x: np.ndarray, y: np.ndarray, penalties: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, list]:
    """Ridge on centred, standardised x with an unpenalised intercept, one penalty per column of y chosen by
    exact leave-one-out error. One SVD serves every penalty and column: coef = V diag(d/(d^2+p)) U'y,
    hat_ii = 1/m + sum_k U_ik^2 d_k^2/(d_k^2+p). Returns ((1 + n_features, columns) coefficients, intercept
    first; the leave-one-out mean squared error of each column; the chosen penalties)."""
    m = x.shape[0]
    u, d, vt = np.linalg.svd(x, full_matrices=False)
    intercept = y.mean(axis=0)
    uty = u.T @ (y - intercept)
    coefs, errors, chosen = [], [], []
    for j in range(y.shape[1]):
        best = None
        for penalty in penalties:
            shrink = d ** 2 / (d ** 2 + penalty)
            fitted = intercept[j] + u @ (shrink * uty[:, j])
            hat = 1.0 / m + (u ** 2) @ shrink
            loo = float(np.mean(((y[:, j] - fitted) / np.clip(1.0 - hat, 1e-9, None)) ** 2))
            if best is None or loo < best[0]:
                best = (loo, penalty, vt.T @ (d / (d ** 2 + penalty) * uty[:, j]))
        coefs.append(np.concatenate([[intercept[j]], best[2]]))
        errors.append(best[0])
        chosen.append(best[1])
    return np.stack(coefs, axis=1), np.asarray(errors), chosen


@dataclass
class Surrogate:
    """Predicts the exact env's final metrics from an allocation; pure numpy, microseconds per call."""

    header: dict
    config: FitConfig
    mean: np.ndarray      # feature standardisation
    scale: np.ndarray
    coef: np.ndarray      # (1 + n_features, len(TARGETS)), intercept first
    penalties: list[tuple[float, float]]  # (ridge penalty, per-unit column scale) chosen for each metric
    bounds: np.ndarray    # (2, len(TARGETS)): the fitted range of each regressed metric; predictions stay in it
    spread: list[tuple] | None = None  # per reward metric (log ppl, fact_acc): (vt, d, penalty, column scale,
    #                                    leave-one-out rms error), for `uncertainty`

    def __post_init__(self) -> None:
        self._numel, profile = _profile(self.header)
        self._linear = linear_map(self.config, self._numel, profile)
        self._dense = dict(self.header["dense"])

    @property
    def n_units(self) -> int:
        return len(self.header["unit_numel"])

    def _design(self, allocations) -> np.ndarray:
        """The standardised features of (m, n_units) allocations (checked)."""
        s = np.atleast_2d(np.asarray(allocations, dtype=np.float64))
        if s.shape[1] != self.n_units or not np.isfinite(s).all():
            raise ValueError(f"allocation of shape {s.shape[1:]} must hold {self.n_units} finite ratios, one per unit")
        return (features(s, self.config, self._numel, self._linear) - self.mean) / self.scale

    def _metrics(self, out: np.ndarray) -> dict[str, np.ndarray]:
        dense = self._dense
        log_ratio = np.expm1(out[:, 0]) if self.config.compress_ppl else out[:, 0]
        return {"ppl": dense["ppl"] * np.exp(log_ratio),
                "fact_acc": np.clip(out[:, 1], 0.0, 1.0), "fact_nll": np.maximum(out[:, 2], 0.0),
                "fact_retention": np.clip(out[:, 3], 0.0, 1.0)}

    def _spread(self, x: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
        spread = {}
        for name, (vt, d, penalty, column_scale, rms) in zip(("log_ppl_ratio", "fact_acc"), self.spread or []):
            xs = x * column_scale
            along = xs @ vt.T
            leverage = (along ** 2 / (d ** 2 + penalty)).sum(1) + \
                np.maximum((xs ** 2).sum(1) - (along ** 2).sum(1), 0.0) / penalty
            spread[name] = rms * np.sqrt(leverage)
        if "log_ppl_ratio" in spread and self.config.compress_ppl:  # d log_ratio / dz = exp(z)
            spread["log_ppl_ratio"] = spread["log_ppl_ratio"] * np.exp(out[:, 0])
        return spread

    def predict_many(self, allocations) -> dict[str, np.ndarray]:
        x = self._design(allocations)
        return self._metrics(np.clip(self.coef[0] + x @ self.coef[1:], self.bounds[0], self.bounds[1]))

    def uncertainty(self, allocations) -> dict[str, np.ndarray]:
        """How far an allocation is from what the data set covers, in each reward metric's units: the
        leave-one-out rms error times sqrt(x'(X'X + pI)^-1 x) (the ridge's Bayesian posterior spread: small
        where the data are, growing where a policy extrapolates). log_ppl_ratio is the spread of
        log(ppl / ppl_dense) (through the log1p compression), fact_acc of the accuracy."""
        return self.predict_with_spread(allocations)[1]

    def predict_with_spread(self, allocations) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """`predict_many` and `uncertainty` from one feature computation (a surrogate episode's end)."""
        x = self._design(allocations)
        out = np.clip(self.coef[0] + x @ self.coef[1:], self.bounds[0], self.bounds[1])
        return self._metrics(out), self._spread(x, out)

    def predict(self, allocation, target_sparsity: float | None = None) -> dict[str, float]:
        """Metrics of the model pruned to `allocation` (the per-unit ratios the env applied). The target is
        implied by the allocation (its parameter-weighted mean); when given it must agree to 1e-3."""
        s = np.asarray(allocation, dtype=np.float64).reshape(1, -1)
        if target_sparsity is not None and s.shape[1] == self.n_units:
            achieved = float(s[0] @ self._numel / self._numel.sum())
            if abs(achieved - target_sparsity) > 1e-3:
                raise ValueError(f"allocation averages {achieved:.4f}, not target_sparsity {target_sparsity}: "
                                 "pass the ratios the env applied")
        return {key: float(value[0]) for key, value in self.predict_many(s).items()}


def _profile(header: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit sizes and the dense profile (2, n_units) the data set was drawn on."""
    profile = header.get("profile")
    z = None if profile is None else np.asarray([profile["z_wanda"], profile["z_grad"]], dtype=np.float64)
    return np.asarray(header["unit_numel"], dtype=np.float64), z


def fit(dataset: Dataset, config: FitConfig = FitConfig(), records: list[dict] | None = None) -> Surrogate:
    """Fit on `records` (default: all of the data set's)."""
    records = dataset.records if records is None else records
    if len(records) < 3:
        raise ValueError(f"a surrogate needs at least 3 records, the data set has {len(records)}: "
                         f"rebuild it with {REBUILD}")
    s = np.asarray([r["allocation"] for r in records], dtype=np.float64)
    dense = dataset.header["dense"]
    log_ratio = np.log([r["ppl"] / dense["ppl"] for r in records])
    if config.compress_ppl:
        log_ratio = np.log1p(np.maximum(log_ratio, -0.99))
    y = np.stack([log_ratio] +
                 [np.asarray([r[key] for r in records], dtype=np.float64) for key in TARGETS[1:]], axis=1)
    numel, profile = _profile(dataset.header)
    raw = features(s, config, numel, linear_map(config, numel, profile))
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    scale[scale < 1e-12] = 1.0
    x = (raw - mean) / scale
    n_shared = x.shape[1] - s.shape[1] * (int(config.unit_linear) + len(config.unit_knots))
    best = None
    for unit_scale in config.unit_scales:
        column_scale = np.where(np.arange(x.shape[1]) < n_shared, 1.0, unit_scale)
        coef, errors, penalties = _ridge(x * column_scale, y, config.penalties)
        coef[1:] *= column_scale[:, None]  # back to coefficients of the unscaled standardised features
        if best is None:
            best = [coef, errors, [(p, unit_scale) for p in penalties]]
            continue
        better = errors < best[1]
        best[0][:, better] = coef[:, better]
        best[1] = np.where(better, errors, best[1])
        best[2] = [(p, unit_scale) if b else old for p, b, old in zip(penalties, better, best[2])]
    coef, errors, chosen = best
    bounds = np.stack([y.min(axis=0), y.max(axis=0)])
    spread = []
    for column in (0, 1):  # the reward's metrics: log ppl ratio and fact accuracy
        penalty, unit_scale = chosen[column]
        column_scale = np.where(np.arange(x.shape[1]) < n_shared, 1.0, unit_scale)
        _, d, vt = np.linalg.svd(x * column_scale, full_matrices=False)
        spread.append((vt, d, penalty, column_scale, float(np.sqrt(errors[column]))))
    return Surrogate(dataset.header, config, mean, scale, coef, chosen, bounds, spread)


def reward_spread(spread: dict, reward: dict) -> np.ndarray:
    """`reward`: a RewardConfig as `dataclasses.asdict` gives it (the data set header's `reward`).

    The spread of the terminal reward from the per-metric spreads (`Surrogate.uncertainty`): the weighted
    log-ppl and fact-accuracy spreads combined as independent errors; `surrogate_pessimism` multiplies it."""
    return np.hypot(reward["ppl_weight"] * np.asarray(spread["log_ppl_ratio"]),
                    reward["fact_weight"] * np.asarray(spread["fact_acc"]))


def quality_of(metrics: dict, dense: dict, reward: dict) -> np.ndarray | float:
    """LayerPrune-v0's terminal reward from (predicted or exact) metrics, as `rewards.quality` computes it."""
    return (-reward["ppl_weight"] * np.log(np.asarray(metrics["ppl"]) / dense["ppl"])
            - reward["fact_weight"] * (dense["fact_acc"] - np.asarray(metrics["fact_acc"])))


# --------------------------------------------------------------------------- held-out fidelity


def heldout(dataset: Dataset, folds: int = 5, config: FitConfig = FitConfig()) -> dict:
    """Fidelity on allocations the fit never saw: k-fold by draw number (fold = draw % folds). Returns the
    Spearman rank correlation of predicted vs exact reward overall and within each target, the bias (mean
    predicted - exact reward) and the mean absolute error, with the per-record predictions; and the same
    within-target Spearman and error for fact retention: the reward does not pay it, and these say whether
    a retention term could rest on this fit."""
    from scipy.stats import spearmanr

    records = dataset.records
    if len(records) < 2 * folds:
        raise ValueError(f"{len(records)} records are too few for {folds}-fold held-out figures")
    dense, reward = dataset.header["dense"], dataset.header["reward"]
    exact = np.asarray([r["quality"] for r in records])
    predicted, retention = np.empty(len(records)), np.empty(len(records))
    for fold in range(folds):
        test = [i for i, r in enumerate(records) if r["draw"] % folds == fold]
        train = [r for r in records if r["draw"] % folds != fold]
        model = fit(dataset, config, train)
        metrics = model.predict_many([records[i]["allocation"] for i in test])
        predicted[test] = quality_of(metrics, dense, reward)
        retention[test] = metrics["fact_retention"]
    targets = np.asarray([r["target"] for r in records])
    kept = np.asarray([r["fact_retention"] for r in records])

    def per_target(truth: np.ndarray, guess: np.ndarray) -> dict:
        figures = {}
        for t in sorted(set(targets.tolist())):
            pick = targets == t
            figures[str(t)] = float(spearmanr(truth[pick], guess[pick]).statistic) if pick.sum() > 2 else None
        return figures

    return {"records": len(records), "folds": folds, "spearman": float(spearmanr(exact, predicted).statistic),
            "spearman_per_target": per_target(exact, predicted), "bias": float(np.mean(predicted - exact)),
            "mae": float(np.mean(np.abs(predicted - exact))),
            "retention_spearman_per_target": per_target(kept, retention),
            "retention_mae": float(np.mean(np.abs(retention - kept))),
            "exact": exact.tolist(), "predicted": predicted.tolist()}


# --------------------------------------------------------------------------- serving

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
            f"build one for this env with `python scripts/build_surrogate.py --model {wanted.get('model')} "
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
