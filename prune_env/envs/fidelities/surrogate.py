"""surrogate: no weight is touched and no forward runs; the terminal metrics are `prune_env.surrogate`'s
prediction for the allocation, fitted on exactly evaluated allocations.

Each balanced knowledge metric (fact_retention_balanced, fact_acc_balanced, fact_answer_ppl_balanced) is
predicted when records of the data set carry it; otherwise it is absent from the metrics and `info`, and a reward
term that reads it fails with `MissingKnowledgeError` naming the data set (never a silent 0).

A data set whose header records the dense profile, unit sizes, dense metrics and data config (what
`python -m prune_env.surrogate build` writes) needs no model at all: `surrogate_context` checks the env's model
arguments against the header and returns a `SurrogateContext`, a light stand-in for `PruningContext`
that holds the units, their sizes, the profile and the dense metrics (a few kB; builds in milliseconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ...context import DataConfig, Metrics, PruningContext
from ...pruning.masking import parse_pattern
from ...pruning.methods import check_method
from ..rewards import LOWER_IS_BETTER, RewardConfig
from ...surrogate import Surrogate, SurrogateMismatchError, fitted_surrogate, load_surrogate, reward_spread
from ...validation import check_device, check_dtype
from .base import Fidelity

HEADER_KEYS = ("profile", "unit_numel", "context", "data_config", "dense")


@dataclass(frozen=True)
class LinearCount:
    """A linear layer as the surrogate sees it: its weight count."""

    numel: int


@dataclass
class SurrogateUnit:
    """A unit as the surrogate sees it: a name and its linears' weight counts (one entry for the whole unit
    unless the header lists `linear_numel`, the per-linear counts the exact env rounds each ratio to)."""

    name: str
    index: int
    linears: list[LinearCount]
    kind: str = "block"

    @property
    def numel(self) -> int:
        return sum(ref.numel for ref in self.linears)


@dataclass
class SurrogateContext:
    """What a surrogate env has instead of a model-backed `PruningContext` (read from the data set header):
    spec, device, dtype, granularity, method, pattern, data, units (name, index, numel, kind), total_numel,
    z_wanda, z_grad (the dense profile the fit was drawn on), dense (Metrics) and `describe()`."""

    spec: str
    device: str
    dtype: str
    granularity: str
    method: str
    pattern: str | None
    data: DataConfig
    units: list[SurrogateUnit]
    z_wanda: list[float]
    z_grad: list[float]
    dense: Metrics
    description: dict = field(repr=False)

    @property
    def total_numel(self) -> int:
        return sum(unit.numel for unit in self.units)

    def describe(self) -> dict:
        return dict(self.description)

    def weighted_sparsity(self, unit_ratios: list[float]) -> float:
        return sum(u.numel * r for u, r in zip(self.units, unit_ratios)) / self.total_numel

    def restore(self) -> None:
        """Nothing to restore: no weight is ever touched."""

    def release(self) -> None:
        """Nothing to release: no model and no file is held."""

    def pruning_context(self) -> PruningContext:
        """A model-backed context for the same model and data (to replay an allocation exactly)."""
        return PruningContext(self.spec, device=self.device, dtype=self.dtype, granularity=self.granularity,
                              method=self.method, pattern=self.pattern, data=self.data)


def surrogate_context(path: str | None, model: str, device: str, dtype: str, granularity: str, method: str,
                      pattern: str | None, data: dict | None) -> SurrogateContext | None:
    """The light context of the data set at `path` (None: the packaged one) for these env arguments, or None
    when its header cannot describe the units alone (no profile or data config; linear granularity).
    Arguments the data set was not built for raise SurrogateMismatchError before anything loads."""
    config = DataConfig.from_dict(data)
    method = check_method(method)
    parse_pattern(pattern)
    check_dtype(dtype)
    check_device(device)
    surrogate = fitted_surrogate(path)
    header = surrogate.header
    if any(key not in header for key in HEADER_KEYS) or header["context"].get("granularity") != "block":
        return None
    built = header["context"]
    wanted = {"model": model, "dtype": dtype, "granularity": granularity, "method": method, "pattern": pattern,
              "data": asdict(config)}
    have = {**{key: built.get(key) for key in wanted if key != "data"},
            "data": asdict(DataConfig.from_dict(header["data_config"]))}
    differ = [key for key in wanted if wanted[key] != have[key]]
    if differ:
        def show(values: dict) -> str:
            return ", ".join(f"{key}={values[key]!r}"[:300] for key in differ)
        raise SurrogateMismatchError(
            f"surrogate data set {str(path or 'the packaged one')!r} was built for {show(have)}; this env has "
            f"{show(wanted)}: build one for this env with `python -m prune_env.surrogate build --model {model} "
            f"--out PATH` and pass it as surrogate=PATH")
    linear_numel = header.get("linear_numel") or [[n] for n in header["unit_numel"]]
    units = [SurrogateUnit(f"block.{i}", i, [LinearCount(int(n)) for n in counts])
             for i, counts in enumerate(linear_numel)]
    profile = header["profile"]
    return SurrogateContext(model, device, dtype, granularity, method, pattern, config, units,
                            list(profile["z_wanda"]), list(profile["z_grad"]), _dense_metrics(header["dense"]),
                            dict(built))


def _dense_metrics(dense: dict) -> Metrics:
    """The header's dense metrics; data sets built before the balanced knowledge metric lack its fields,
    which then read NaN (unknown), never 0: a reward that needs them fails instead of using a fake value."""
    unknown = {"fact_retention_balanced": float("nan"), "fact_acc_balanced": float("nan"),
               "fact_answer_ppl_balanced": float("nan"), "retention_by_relation": {}}
    return Metrics(**{**unknown, **dense})


class SurrogateFidelity(Fidelity):
    name = "surrogate"

    def __init__(self, context: SurrogateContext | PruningContext, path: str | None, reward: RewardConfig):
        self.context = context
        self._surrogate: Surrogate | None = load_surrogate(path, context)
        self._reward = asdict(reward)
        self.reference = context.dense
        self._linear_numel = [[ref.numel for ref in unit.linears] for unit in context.units]
        # the knowledge objective's spread is the fit's, in the objective's units (rewards.knowledge_objective)
        self._knowledge_metric = reward.knowledge_metric
        dense = getattr(self.reference, reward.knowledge_metric)
        self._knowledge_units: float | None = None  # dense NaN or 0: no knowledge objective to lower
        if dense > 0:
            self._knowledge_units = 1.0 if reward.knowledge_metric in LOWER_IS_BETTER else 1.0 / dense

    def prune_unit(self, index: int, ratio: float) -> tuple[int, None]:
        """The weights each operator would remove, counted, not removed."""
        return sum(round(ratio * numel) for numel in self._linear_numel[index]), None

    def finish(self, ratios: list[float], zeros: list[int]) -> dict:
        many, spread = self._surrogate.predict_with_spread([ratios])
        predicted = {key: float(value[0]) for key, value in many.items()}
        std = float(reward_spread(spread, self._reward)[0])
        extra = {"achieved_sparsity": sum(zeros) / self.context.total_numel, "surrogate_std": std}
        if self._knowledge_units is not None and self._knowledge_metric in spread:
            extra["surrogate_knowledge_std"] = float(spread[self._knowledge_metric][0]) * self._knowledge_units
        return self._surrogate.as_metrics({**predicted, **extra})

    def close(self) -> None:
        self._surrogate = None
