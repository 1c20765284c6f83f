"""The benchmark config: a typed dataclass read from YAML + key=value overrides, checked before any work.

Every key and its default is a field below (configs/benchmark.yaml documents them); the env data
(`data`) takes its defaults from `prune_env.context.DataConfig`, the one set of calibration defaults.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from agents.llm.options import check_backend
from prune_env.config_files import dataclass_from_dict, load_config
from prune_env.context import GRANULARITIES, DataConfig
from prune_env.pruning.masking import parse_pattern
from prune_env.pruning.sequential import check_method
from prune_env.validation import check_choice, check_device, check_dtype, check_number, check_target

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "benchmark.yaml"

DEFAULT_AGENTS: list[dict] = [
    {"name": "uniform"},
    {"name": "owl", "lam": 0.08, "m": 5},
    {"name": "alphapruning", "eps": 0.3},
    {"name": "random"},
    {"name": "zscore-greedy", "spread": 0.1},
]


@dataclass
class HeldoutConfig:
    """The held-out evaluation of every cell (see prune_bench.heldout for where it lies)."""

    eval_tokens: int = 20480
    eval_seq_len: int = 512
    eval_offset: int | Literal["auto"] = "auto"  # auto = first token after the env's evaluation region
    n_facts: int = 0  # 0 = all facts after facts_offset
    facts_offset: int | Literal["auto"] = "auto"  # auto = data.facts_offset + data.n_facts

    def __post_init__(self) -> None:
        check_number("eval_tokens", self.eval_tokens, low=1, integer=True)
        check_number("eval_seq_len", self.eval_seq_len, low=1, integer=True)
        if self.eval_tokens < self.eval_seq_len:
            raise ValueError(f"eval_tokens={self.eval_tokens} is less than one window of "
                             f"eval_seq_len={self.eval_seq_len}: raise eval_tokens or lower eval_seq_len")
        for name, value in (("eval_offset", self.eval_offset), ("facts_offset", self.facts_offset)):
            if value != "auto":
                check_number(name, value, low=0, integer=True)
        check_number("n_facts", self.n_facts, low=0, integer=True)


@dataclass
class RayConfig:
    address: str | None = None  # None = start a local Ray instance
    num_workers: int = 1
    num_cpus_per_worker: int | float = 1
    num_gpus_per_worker: int | float | Literal["auto"] = "auto"  # auto = 1 on cuda, else 0
    num_cpus: int | None = None  # CPUs of a local instance (None = all)
    runtime_env: dict | None = None  # None locally = this checkout on PYTHONPATH

    def __post_init__(self) -> None:
        check_number("num_workers", self.num_workers, low=1, integer=True)
        check_number("num_cpus_per_worker", self.num_cpus_per_worker, low=0)
        if self.num_gpus_per_worker != "auto":
            check_number("num_gpus_per_worker", self.num_gpus_per_worker, low=0)
        if self.num_cpus is not None:
            check_number("num_cpus", self.num_cpus, low=1, integer=True)


@dataclass
class ExportCell:
    """A cell whose pruned model is saved into <out>/export/<cell> and reloaded as a check."""

    agent: str
    target: float
    seed: int


@dataclass
class ReportConfig:
    allocation_target: float | None = None  # sparsity of the one allocation plot (None = one per target)


@dataclass
class BenchmarkConfig:
    model: str = "smollm2-135m"
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"
    granularity: str = "block"
    method: str = "wanda"
    pattern: str | None = None
    targets: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    agents: list[dict | str] = field(default_factory=lambda: copy.deepcopy(DEFAULT_AGENTS))
    data: DataConfig = field(default_factory=DataConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    threads: int | None = None
    reuse_deterministic: bool = True
    backend: str = "serial"
    ray: RayConfig = field(default_factory=RayConfig)
    export: list[ExportCell] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)
    out: str = "runs/benchmark"

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_method(self.method)
        parse_pattern(self.pattern)
        check_choice("backend", self.backend, ("serial", "ray"))
        if not self.targets:
            raise ValueError("targets=[] is empty: give a list of target sparsities in (0, 1), e.g. [0.5]")
        for i, target in enumerate(self.targets):
            check_target(target, f"targets[{i}]")
        if len({round(float(t), 9) for t in self.targets}) != len(self.targets):
            raise ValueError(f"targets={self.targets} contain duplicates: give each sparsity once")
        if not self.seeds:
            raise ValueError("seeds=[] is empty: give a list of non-negative integers, e.g. [0]")
        for i, seed in enumerate(self.seeds):
            check_number(f"seeds[{i}]", seed, low=0, integer=True)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} contain duplicates: give each seed once")
        if self.threads is not None:
            check_number("threads", self.threads, low=1, integer=True)
        if not self.out:
            raise ValueError("out='' is empty: give the output folder")
        self.agents = [{"name": a} if isinstance(a, str) else dict(a) for a in self.agents]
        if not self.agents:
            raise ValueError("agents=[] is empty: give a list of agent configs, e.g. [{name: uniform}]")
        for i, agent in enumerate(self.agents):
            if agent.get("name") == "rl" and isinstance(agent.get("path"), str) and not Path(agent["path"]).exists():
                raise ValueError(f"agents[{i}].path={agent['path']!r} does not exist: give a train.py run folder "
                                 f"or a saved policy .zip")
            if agent.get("name") == "llm":  # a served model's URL and id, before any model loads
                try:
                    check_backend(agent.get("backend"))
                except ValueError as error:
                    raise ValueError(f"agents[{i}] ({agent.get('label') or 'llm'}): {error}") from None
        if self.report.allocation_target is not None:
            check_target(self.report.allocation_target, "report.allocation_target")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BenchmarkConfig":
        return dataclass_from_dict(cls, values, "config")


def defaults() -> dict:
    """The config schema: every key a benchmark config may set, with its default."""
    return BenchmarkConfig().to_dict()


def parse_export(text: str) -> dict:
    """'owl:0.5:0' -> {"agent": "owl", "target": 0.5, "seed": 0} (the agent label may contain ':')."""
    parts = text.rsplit(":", 2)
    try:
        return {"agent": parts[0], "target": float(parts[1]), "seed": int(parts[2])}
    except (ValueError, IndexError):
        raise ValueError(f"--export {text!r} must be AGENT:TARGET:SEED, e.g. owl:0.5:0") from None


def load_benchmark_config(path: str | Path | None = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
                          eval_text: str | None = None, facts: str | None = None, out: str | None = None,
                          export: list[str] | None = None) -> BenchmarkConfig:
    """defaults <- YAML <- key=value overrides <- the CLI flags, typed and checked once."""
    values = load_config(path, overrides, defaults())
    if eval_text is not None:
        values["data"]["text"] = eval_text
    if facts is not None:
        values["data"]["facts"] = facts
    if out is not None:
        values["out"] = out
    values["export"] = list(values["export"] or []) + [parse_export(item) for item in export or []]
    return BenchmarkConfig.from_dict(values)
