"""The surrogate's fit: ridge regressions of the exact env's final metrics on a low-dimensional description
of the allocation, refitted at load from the data set (milliseconds, pure numpy, ~0.1 ms a prediction).

    surrogate = fit(read_dataset(path))
    surrogate.predict(allocation, target_sparsity)  # {"ppl", "fact_acc", "fact_nll", "fact_retention", ...}

Regressed: log1p(log ppl ratio) and the fact metrics, plus each answer-balanced knowledge metric that records
carry (fact_retention_balanced, fact_acc_balanced, the log of fact_answer_ppl_balanced). Features: the level of the
damage (powers of the budget, hinges of the sparsity shared by all units), its shape (tilt along depth and
along the dense profile's z-scores, spread, the end units) and per-unit terms whose weight the fit chooses
by leave-one-out error, so the per-unit detail grows with the data. `cross_validated` gives the k-fold
figures (Spearman of predicted vs exact reward and balanced retention, overall and per target; bias):
"held-out" is kept for the benchmark's unseen text and facts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..envs.rewards import LOWER_IS_BETTER, RewardConfig, quality
from .dataset import KNOWLEDGE, REBUILD, Dataset, SurrogateDataError

# --------------------------------------------------------------------------- the fit

TARGETS = ("log_ppl_ratio", "fact_acc", "fact_nll", "fact_retention")
"""What is always regressed: log(ppl / ppl_dense) (ppl spans orders of magnitude), and the fact metrics as
they are; `KNOWLEDGE` (the balanced metrics) follow when records carry them."""
MIN_RECORDS = 3
"""The fewest records a metric is fitted on (the ridge's intercept, slope and leave-one-out error)."""


def targets_of(records: list[dict]) -> tuple[str, ...]:
    """The regressed metrics of a set of records: TARGETS, plus each KNOWLEDGE metric that at least
    MIN_RECORDS records carry. Each metric is fitted on the records that carry it: log ppl on all of them, the
    fact metrics on those with facts (a data set joined with `merge --perplexity-from` holds perplexity-only
    records), each balanced knowledge metric on the records built since the code reported it."""
    return TARGETS + tuple(k for k in KNOWLEDGE if sum(k in r for r in records) >= MIN_RECORDS)


def _column(records: list[dict], name: str) -> np.ndarray:
    """A metric of every record, NaN where a record does not carry it."""
    return np.asarray([r.get(name, np.nan) for r in records], dtype=np.float64)


def _regressed(records: list[dict], name: str) -> np.ndarray:
    """What the fit regresses for a metric: a perplexity (LOWER_IS_BETTER) by its log, a share as it is."""
    column = _column(records, name)
    return np.log(column) if name in LOWER_IS_BETTER else column


class MissingKnowledgeError(SurrogateDataError, KeyError):
    """A balanced knowledge metric was asked of a surrogate whose data set has no record carrying it."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class SurrogateMetrics(dict):
    """A prediction's metrics; reading a knowledge metric the data set lacks raises MissingKnowledgeError
    (a reward term reading it fails with the reason instead of a bare KeyError or a silent 0)."""

    def __init__(self, values: dict, source: str):
        super().__init__(values)
        self.source = source

    def __missing__(self, key: str):
        if key in KNOWLEDGE:
            raise MissingKnowledgeError(
                f"{key} is not predicted: the surrogate data set {self.source} has no record with it (built "
                f"before records carried knowledge): rebuild it with {REBUILD} or use fidelity='exact'")
        raise KeyError(key)


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
    records the profile: the build always does), then s itself
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
    coef: np.ndarray      # (1 + n_features, len(targets)), intercept first
    penalties: list[tuple[float, float]]  # (ridge penalty, per-unit column scale) chosen for each metric
    bounds: np.ndarray    # (2, len(targets)): the fitted range of each regressed metric; predictions stay in it
    spread: list[tuple] | None = None  # per reward metric (log ppl, fact_acc, then each knowledge target, in
    #                                    targets' order): (vt, d, penalty, column scale,
    #                                    leave-one-out rms error), for `uncertainty`
    targets: tuple[str, ...] = TARGETS  # the regressed metrics, in coef's column order
    source: str = "(in memory)"  # the data set's path, named in errors

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
        metrics = {"ppl": dense["ppl"] * np.exp(log_ratio), "fact_nll": np.maximum(out[:, 2], 0.0)}
        for column, name in enumerate(self.targets):
            if name in LOWER_IS_BETTER:  # regressed as its log
                metrics[name] = np.exp(out[:, column])
            elif column not in (0, 2):  # accuracies and retentions are shares
                metrics[name] = np.clip(out[:, column], 0.0, 1.0)
        return metrics

    @property
    def knows(self) -> bool:
        """Whether any balanced knowledge metric is predicted (records of the data set carry it)."""
        return len(self.targets) > len(TARGETS)

    def _spread(self, x: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
        spread = {}
        names = ("log_ppl_ratio", "fact_acc", *self.targets[len(TARGETS):])
        for name, (vt, d, penalty, column_scale, rms) in zip(names, self.spread or []):
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
        log(ppl / ppl_dense) (through the log1p compression), fact_acc of the accuracy, each knowledge metric's
        in its regressed units (the log of the answer perplexity, the share itself for the others)."""
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
        return self.as_metrics({key: float(value[0]) for key, value in self.predict_many(s).items()})

    def as_metrics(self, values: dict) -> SurrogateMetrics:
        """`values` as SurrogateMetrics: a knowledge metric this fit lacks fails clearly when read."""
        return SurrogateMetrics(values, self.source)


def _profile(header: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit sizes and the dense profile (2, n_units) the data set was drawn on."""
    profile = header.get("profile")
    z = None if profile is None else np.asarray([profile["z_wanda"], profile["z_grad"]], dtype=np.float64)
    return np.asarray(header["unit_numel"], dtype=np.float64), z


def fit(dataset: Dataset, config: FitConfig = FitConfig(), records: list[dict] | None = None) -> Surrogate:
    """Fit on `records` (default: all of the data set's); each metric on the records that carry it, all with
    one standardisation of the features (that of every record)."""
    records = dataset.records if records is None else records
    with_facts = sum("fact_acc" in r for r in records)
    if len(records) < MIN_RECORDS or with_facts < MIN_RECORDS:
        raise ValueError(f"a surrogate needs at least {MIN_RECORDS} records with fact metrics, the data set has "
                         f"{with_facts} (of {len(records)}): rebuild it with {REBUILD}")
    s = np.asarray([r["allocation"] for r in records], dtype=np.float64)
    targets = targets_of(records)
    dense = dataset.header["dense"]
    log_ratio = np.log([r["ppl"] / dense["ppl"] for r in records])
    if config.compress_ppl:
        log_ratio = np.log1p(np.maximum(log_ratio, -0.99))
    y = np.stack([log_ratio] + [_regressed(records, key) for key in targets[1:]], axis=1)
    numel, profile = _profile(dataset.header)
    raw = features(s, config, numel, linear_map(config, numel, profile))
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    scale[scale < 1e-12] = 1.0
    x = (raw - mean) / scale
    n_shared = x.shape[1] - s.shape[1] * (int(config.unit_linear) + len(config.unit_knots))
    coef = np.zeros((1 + x.shape[1], y.shape[1]))
    errors = np.zeros(y.shape[1])
    chosen: list = [None] * y.shape[1]
    rows_of = [np.isfinite(y[:, j]) for j in range(y.shape[1])]
    groups: dict[bytes, list[int]] = {}
    for j, rows in enumerate(rows_of):
        groups.setdefault(rows.tobytes(), []).append(j)
    for columns in groups.values():  # metrics carried by the same records share one SVD
        rows = rows_of[columns[0]]
        for unit_scale in config.unit_scales:
            column_scale = np.where(np.arange(x.shape[1]) < n_shared, 1.0, unit_scale)
            part, part_errors, penalties = _ridge(x[rows] * column_scale, y[rows][:, columns], config.penalties)
            part[1:] *= column_scale[:, None]  # back to coefficients of the unscaled standardised features
            for k, j in enumerate(columns):
                if chosen[j] is None or part_errors[k] < errors[j]:
                    coef[:, j], errors[j], chosen[j] = part[:, k], part_errors[k], (penalties[k], unit_scale)
    bounds = np.stack([np.nanmin(y, axis=0), np.nanmax(y, axis=0)])
    spread = []
    for column in (0, 1, *range(len(TARGETS), len(targets))):  # the rewards' metrics: log ppl, fact acc, knowledge
        penalty, unit_scale = chosen[column]
        column_scale = np.where(np.arange(x.shape[1]) < n_shared, 1.0, unit_scale)
        _, d, vt = np.linalg.svd(x[rows_of[column]] * column_scale, full_matrices=False)
        spread.append((vt, d, penalty, column_scale, float(np.sqrt(errors[column]))))
    return Surrogate(dataset.header, config, mean, scale, coef, chosen, bounds, spread, targets,
                     repr(str(dataset.path)) if dataset.path else "(in memory)")


def reward_spread(spread: dict, reward: dict) -> np.ndarray:
    """`reward`: a RewardConfig as `dataclasses.asdict` gives it (the data set header's `reward`).

    The spread of the terminal reward from the per-metric spreads (`Surrogate.uncertainty`): the weighted
    log-ppl and fact-accuracy spreads combined as independent errors; `surrogate_pessimism` multiplies it."""
    return np.hypot(reward["ppl_weight"] * np.asarray(spread["log_ppl_ratio"]),
                    reward["fact_weight"] * np.asarray(spread["fact_acc"]))


def quality_of(metrics: dict, dense: dict, reward: dict) -> np.ndarray:
    """LayerPrune-v0's terminal reward (its built-in part) of each (predicted or exact) metrics entry:
    `rewards.quality` itself, so the formula has one home. `reward`: a RewardConfig as a dict."""
    config = RewardConfig.from_dict(reward)
    ppl, acc = np.broadcast_arrays(np.asarray(metrics["ppl"], float), np.asarray(metrics["fact_acc"], float))
    values = [quality(p, a, dense["ppl"], dense["fact_acc"], config) for p, a in zip(ppl.ravel(), acc.ravel())]
    return np.asarray(values).reshape(ppl.shape)


# --------------------------------------------------------------------------- k-fold figures


def cross_validated(dataset: Dataset, folds: int = 5, config: FitConfig = FitConfig()) -> dict:
    """Fidelity on allocations the fit never saw: k-fold by draw number (fold = draw % folds), the fit
    refitted on the other folds. For the reward (`quality`: top-level keys, with the per-record predictions)
    and for each regressed metric (`metrics`: log_ppl, fact_acc, fact_retention and, when the records carry
    them, the balanced knowledge metrics, the answer perplexity as log_fact_answer_ppl_balanced): the
    Spearman rank correlation of predicted vs exact, overall and within each target, the bias (mean predicted - exact) and the mean absolute error. Within-target
    Spearman is what matters: it says whether the fit ranks allocations of one budget as the exact env does."""
    from scipy.stats import spearmanr

    records = dataset.records
    if len(records) < 2 * folds:
        raise ValueError(f"{len(records)} records are too few for {folds}-fold figures: build more "
                         f"(python -m prune_env.surrogate build) or pass fewer folds")
    missing = [key for key in ("draw", "target") if any(key not in r for r in records)]
    if missing:
        raise ValueError(f"records without {missing[0]!r} cannot be cross-validated (folds go by draw, figures by "
                         f"target): use a data set written by {REBUILD}")
    dense, reward = dataset.header["dense"], dataset.header["reward"]
    names = ("ppl", "fact_acc", "fact_retention") + targets_of(records)[len(TARGETS):]
    exact = {"quality": _column(records, "quality")}
    exact.update({name: _column(records, name) for name in names})
    guess = {name: np.full(len(records), np.nan) for name in exact}
    for fold in range(folds):
        test = [i for i, r in enumerate(records) if r["draw"] % folds == fold]
        predicted = fit(dataset, config, [r for r in records if r["draw"] % folds != fold]).predict_many(
            [records[i]["allocation"] for i in test])
        guess["quality"][test] = quality_of(predicted, dense, reward)
        for name in names:
            guess[name][test] = predicted[name]
    for name in ("ppl", *[n for n in names if n in LOWER_IS_BETTER]):  # perplexities: bias and error in log
        exact[f"log_{name}"], guess[f"log_{name}"] = np.log(exact.pop(name)), np.log(guess.pop(name))
    targets = np.asarray([r["target"] for r in records])

    def rho(truth: np.ndarray, value: np.ndarray) -> float | None:
        """Spearman's rank correlation; None where it is undefined (under 3 records, or one side constant,
        e.g. no fact retained at all at a high target)."""
        if truth.size < 3 or np.ptp(truth) == 0 or np.ptp(value) == 0:
            return None
        statistic = float(spearmanr(truth, value).statistic)
        return statistic if np.isfinite(statistic) else None

    def figures(truth: np.ndarray, value: np.ndarray) -> dict:
        """On the records that carry the metric (perplexity-only records have no facts and no reward)."""
        carried = np.isfinite(truth)
        truth, value, where = truth[carried], value[carried], targets[carried]
        per_target = {str(t): rho(truth[where == t], value[where == t]) for t in sorted(set(where.tolist()))}
        return {"n": int(carried.sum()), "spearman": rho(truth, value), "spearman_per_target": per_target,
                "bias": float(np.mean(value - truth)), "mae": float(np.mean(np.abs(value - truth)))}

    return {"records": len(records), "folds": folds, **figures(exact["quality"], guess["quality"]),
            "metrics": {name: figures(exact[name], guess[name]) for name in exact if name != "quality"},
            "exact": _listed(exact["quality"]), "predicted": _listed(guess["quality"])}


def _listed(values: np.ndarray) -> list[float | None]:
    """JSON-ready: None where a record has no value (a perplexity-only record's reward)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def summary(dataset: Dataset, folds: int = 5) -> str:
    """Counts per target and kind, seconds per record and the fit's k-fold figures (by draw), as text."""
    records = dataset.records
    counts: dict = {}
    for record in records:
        counts.setdefault(record.get("target"), {}).setdefault(record.get("kind", "?"), 0)
        counts[record.get("target")][record.get("kind", "?")] += 1
    seconds = [r["seconds"] for r in records if "seconds" in r]
    lines = [f"{dataset.path}: {len(records)} records"
             + (f", {np.mean(seconds):.1f} s per exact episode" if seconds else "")]
    lines += [f"  target {t}: {dict(sorted(c.items()))}" for t, c in sorted(counts.items(), key=lambda x: str(x[0]))]
    if len(records) >= 2 * folds:
        figures = cross_validated(dataset, folds)
        for name, values in [("reward", figures), *figures["metrics"].items()]:
            per_target = ", ".join(f"{t}: {'-' if v is None else f'{v:.3f}'}"
                                   for t, v in values["spearman_per_target"].items())
            overall = "-" if values["spearman"] is None else f"{values['spearman']:.3f}"
            lines.append(f"{folds}-fold (by draw) {name} on {values['n']} records: Spearman {overall} (per target "
                         f"{per_target}), bias {values['bias']:+.4f}, MAE {values['mae']:.4f}")
    return "\n".join(lines)
