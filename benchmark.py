"""Benchmark allocation agents on one model, one operator, the same calibration and held-out evaluation.

    python benchmark.py --config configs/benchmark.yaml [key=value ...] [--eval-text FILE] [--facts FILE]
                        [--out DIR] [--resume] [--export AGENT:TARGET:SEED ...] [--report-only]
    python benchmark.py --check-export DIR/export/<cell>

A grid of agents x target sparsities x seeds. In each cell the agent produces an allocation (one ratio
per unit, parameter-weighted sparsity == target), the allocation is applied with `ctx.prune` (the exact
sequential calibrated prune, from the dense model) and the pruned model is measured with
`ctx.evaluate()` on the full held-out evaluation data. Everything every cell sees is the same: one
model, one operator (method / pattern / granularity), one calibration set, one evaluation set. Seeds
only change the agents (random draws, LLM sampling, RL policies); agents that are `deterministic` are
computed once per target and their record is copied to the other seeds (`reused_from_seed`; turn off
with `reuse_deterministic=false`).

Data (documented choice)
------------------------
`data:` is the environment's data (the DataConfig that LayerPrune-v0 / IterativePrune-v0 get, i.e.
the slices their *rewards* are measured on; RL and iterative-LLM agents play envs built with it).
The benchmark evaluates on text and facts the envs never score:
* text: `heldout.eval_tokens` (default 20480) tokens in windows of `heldout.eval_seq_len` (512) starting
  at `heldout.eval_offset`; `auto` = the first token after the env's evaluation region (the env's
  region is computed from the same corpus with the env's DataConfig). Because DataConfig draws the
  calibration windows from [0, eval_offset), the benchmark's calibration windows (same count, length and
  seed as the env's) come from the text before the held-out region, which includes the env's reward
  text: that is text the benchmark never evaluates on, so calibration and evaluation stay disjoint.
* facts: `heldout.facts_offset` `auto` = data.facts_offset + data.n_facts (the first fact after the
  env's reward slice of the same seeded permutation, so data.seed must match the env's), and
  `heldout.n_facts` 0 = all remaining facts (717 of the 917 offline facts with the env defaults).
`--eval-text FILE` / `--facts FILE` set data.text / data.facts (calibration, env and held-out data all
come from that source; the held-out region rule above still applies).

results.json (schema_version 1; checked by `validate_results`)
--------------------------------------------------------------
Top level:
    schema_version  1
    model           model spec (str)
    operator        {"method", "pattern", "granularity"}
    data            ctx.describe() of the benchmark context (text source, calibration starts, evaluation
                    region, facts source / n / offset, units, device, dtype)
    env_data        the env DataConfig (dict) the held-out regions were derived from
    dense           dense metrics on the held-out data {ppl, fact_acc, fact_nll, fact_retention}
    units           [{"name", "numel"}] in allocation order
    machine         {platform, python, cpu_count, torch, transformers, device, cuda_device, backend}
    config          the full benchmark config
    created, updated  ISO timestamps
    exports         [{cell, dir, ppl, ppl_reloaded, ok}] (may be empty)
    records         one per agent x target x seed:
        agent             label (str)
        agent_config      the agent's config dict
        seed              int
        target_sparsity   float in (0, 1)
        achieved_sparsity float (zeros / prunable weights after the prune) or null
        ppl, fact_acc, fact_nll, fact_retention   floats (null when failed)
        allocation        per-unit ratios (list of floats, len == len(units)) or null
        seconds           wall seconds of the cell (0 for reused records)
        timings           {"allocate", "prune", "evaluate"} seconds
        status            "ok" | "failed"
        error             null when ok, else "ExceptionType: message"; `traceback` holds the stack
        llm_model, iterations, rollbacks   LLM agent only (else null); `llm` holds more LLM details,
                          `rl` the policy, algo, training model and env fidelity of RL agents
        reused_from_seed  int or null
results.json is rewritten atomically (tmp file + rename) after every cell. `--resume` keeps the ok
records of an existing results.json made with the same model, operator and data (else it refuses) and
runs the missing and the failed cells. Without `--resume` an existing results.json is never overwritten.

Backends: `backend: serial` runs the cells in this process; `backend: ray` runs them on Ray actors (one
model load per actor; `ray.num_gpus_per_worker` GPUs each when CUDA is used), on a local Ray instance
or on `ray.address`. Both run the same `Runner.run_cell`, so records are identical for the same seeds
as long as torch uses the same number of threads (`threads:`; Ray workers default to their num_cpus).

Outputs in --out: results.json, report.md, allocation_t<target>.png, ppl_vs_sparsity.png,
facts_vs_sparsity.png, transcripts/ (LLM agents), export/<cell>/ (model/, masks.safetensors,
evaluation.safetensors, meta.json) for exported cells.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prune_env.config import is_finite_number, is_int
from prune_env.files import atomic_write_text

ROOT = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
DEFAULT_CONFIG = ROOT / "configs" / "benchmark.yaml"

DEFAULT_AGENTS: list[dict] = [
    {"name": "uniform"},
    {"name": "owl", "lam": 0.08, "m": 5},
    {"name": "alphapruning", "eps": 0.3},
    {"name": "random"},
    {"name": "zscore-greedy", "spread": 0.1},
]


def _data_defaults() -> dict:
    from prune_env.context import DataConfig

    return asdict(DataConfig())


def defaults() -> dict:
    """The config schema: every key a benchmark config may set, with its default."""
    return {
        "model": "smollm2-135m",
        "device": "auto",  # auto: cuda when available, else cpu
        "dtype": "float32",
        "granularity": "block",
        "method": "wanda",
        "pattern": None,
        "targets": [0.3, 0.4, 0.5, 0.6],
        "seeds": [0, 1],
        "agents": copy.deepcopy(DEFAULT_AGENTS),
        "data": _data_defaults(),
        "heldout": {"eval_tokens": 20480, "eval_seq_len": 512, "eval_offset": "auto",
                    "n_facts": 0, "facts_offset": "auto"},
        "threads": None,
        "reuse_deterministic": True,
        "backend": "serial",
        "ray": {"address": None, "num_workers": 1, "num_cpus_per_worker": 1, "num_gpus_per_worker": "auto",
                "num_cpus": None, "runtime_env": None},
        "export": [],
        "report": {"allocation_target": None},
        "out": "runs/benchmark",
    }


class ResultsError(ValueError):
    """A results.json that does not follow the schema, or cannot be resumed."""


# =========================================================================== config


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_export(text: str) -> dict:
    """'owl:0.5:0' -> {"agent": "owl", "target": 0.5, "seed": 0} (the agent label may contain ':')."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise ValueError(f"--export {text!r} must be AGENT:TARGET:SEED, e.g. owl:0.5:0")
    try:
        return {"agent": parts[0], "target": float(parts[1]), "seed": int(parts[2])}
    except ValueError:
        raise ValueError(f"--export {text!r} must be AGENT:TARGET:SEED, e.g. owl:0.5:0") from None


def load_benchmark_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                          eval_text: str | None = None, facts: str | None = None, out: str | None = None,
                          export: list[str] | None = None) -> dict:
    """defaults <- YAML <- key=value overrides <- the CLI flags, checked (see `check_config`)."""
    from prune_env.config import load_config

    cfg = load_config(path, overrides, defaults())
    if eval_text is not None:
        cfg["data"]["text"] = eval_text
    if facts is not None:
        cfg["data"]["facts"] = facts
    if out is not None:
        cfg["out"] = out
    for item in export or []:
        cfg["export"] = list(cfg["export"] or []) + [parse_export(item)]
    check_config(cfg)
    return cfg


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_config(cfg: dict) -> list:
    """Everything checkable without the model (fails in a second, before any load). Returns the agents."""
    from agents.base import build_agent
    from prune_env.context import GRANULARITIES, DataConfig
    from prune_env.masking import parse_pattern
    from prune_env.pruner import check_method

    targets, seeds = cfg["targets"], cfg["seeds"]
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"targets must be a non-empty list of sparsities in (0, 1), got {targets!r}")
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise ValueError(f"target sparsity {t!r} must be a number in (0, 1)")
    if len({round(float(t), 9) for t in targets}) != len(targets):
        raise ValueError(f"targets {targets} contain duplicates")
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                       for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} contain duplicates")
    if cfg["granularity"] not in GRANULARITIES:
        raise ValueError(f"granularity {cfg['granularity']!r}: use one of {list(GRANULARITIES)}")
    check_method(cfg["method"])
    parse_pattern(cfg["pattern"])
    if cfg["backend"] not in ("serial", "ray"):
        raise ValueError(f"backend {cfg['backend']!r}: use 'serial' or 'ray'")
    if cfg["threads"] is not None and (not isinstance(cfg["threads"], int) or cfg["threads"] < 1):
        raise ValueError(f"threads must be a positive integer or null, got {cfg['threads']!r}")
    DataConfig.from_dict(cfg["data"])
    held = cfg["heldout"]
    for key in ("eval_tokens", "eval_seq_len"):
        if not isinstance(held[key], int) or held[key] < 1:
            raise ValueError(f"heldout.{key} must be a positive integer, got {held[key]!r}")
    if held["eval_tokens"] < held["eval_seq_len"]:
        raise ValueError("heldout.eval_tokens must be at least one window of heldout.eval_seq_len")
    for key in ("eval_offset", "facts_offset"):
        v = held[key]
        if not (v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
            raise ValueError(f"heldout.{key} must be 'auto' or a non-negative integer, got {v!r}")
    if not isinstance(held["n_facts"], int) or held["n_facts"] < 0:
        raise ValueError(f"heldout.n_facts must be a non-negative integer (0 = all), got {held['n_facts']!r}")
    if not isinstance(cfg["agents"], list) or not cfg["agents"]:
        raise ValueError("agents must be a non-empty list of agent configs, e.g. [{name: uniform}]")
    agents = [build_agent(a) for a in cfg["agents"]]
    labels = [a.name for a in agents]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"agent(s) {dup} appear more than once: give each a distinct 'label'")
    exports = cfg["export"] or []
    if not isinstance(exports, list):
        raise ValueError("export must be a list of {agent, target, seed}")
    for item in exports:
        if not isinstance(item, dict) or set(item) != {"agent", "target", "seed"}:
            raise ValueError(f"export entry {item!r} must be a mapping with exactly agent, target, seed")
    report_target = cfg["report"]["allocation_target"]
    if report_target is not None and not isinstance(report_target, (int, float)):
        raise ValueError(f"report.allocation_target must be a number or null, got {report_target!r}")
    return agents


def cell_key(agent: str, target: float, seed: int) -> tuple[str, float, int]:
    return (str(agent), round(float(target), 9), int(seed))


def cell_name(agent: str, target: float, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(agent))
    return f"{safe}-t{float(target):g}-s{int(seed)}"


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return _jsonable(x.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return str(x)


# =========================================================================== data and machine


def heldout_data(cfg: dict, tokenizer) -> tuple[Any, dict]:
    """The benchmark's DataConfig (held-out text region and facts, see the module docstring) and a
    description of where the env's reward slices lie."""
    from prune_env.context import DataConfig
    from prune_env.data import load_text, split_corpus, tokenize_corpus

    env = DataConfig.from_dict(cfg["data"])
    held = cfg["heldout"]
    ids = tokenize_corpus(load_text(env.text), tokenizer)
    env_slices = split_corpus(ids, calib_samples=env.calib_samples, calib_seq_len=env.calib_seq_len,
                              eval_tokens=env.eval_tokens, eval_seq_len=env.eval_seq_len, seed=env.seed,
                              eval_offset=env.eval_offset, source=env.text)
    env_end = env_slices.eval_offset + env_slices.evaluation.numel()
    offset = env_end if held["eval_offset"] == "auto" else int(held["eval_offset"])
    needed = offset + (held["eval_tokens"] // held["eval_seq_len"]) * held["eval_seq_len"]
    if needed > ids.numel():
        raise ValueError(f"the corpus {env.text!r} has {ids.numel()} tokens but the held-out evaluation needs "
                         f"[{offset}, {needed}) (after the env's reward region ending at {env_end}): lower "
                         f"heldout.eval_tokens or use a longer text")
    if held["facts_offset"] == "auto":
        if env.n_facts == 0:
            raise ValueError("data.n_facts is 0 (the env scores all facts), so no fact is held out: set "
                             "heldout.facts_offset (and accept the overlap) or give data.n_facts")
        facts_offset = env.facts_offset + env.n_facts
    else:
        facts_offset = int(held["facts_offset"])
    bench = DataConfig(**{**asdict(env), "eval_tokens": held["eval_tokens"], "eval_seq_len": held["eval_seq_len"],
                          "eval_offset": offset, "n_facts": held["n_facts"], "facts_offset": facts_offset})
    env_region = {"text_region": [env_slices.eval_offset, env_end],
                  "facts": [env.facts_offset, env.facts_offset + env.n_facts]}
    return bench, env_region


def machine_info(device: str) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "torch_threads": torch.get_num_threads(), "cuda_device": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return info


# =========================================================================== one worker


class Runner:
    """One model, one context, all agents: runs cells. Used in-process (serial) and as a Ray actor."""

    def __init__(self, cfg: dict, workdir: str | Path | None = None):
        import torch

        from agents.base import build_agent
        from prune_env.context import PruningContext, shared_model

        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.cfg = cfg
        device = resolve_device(cfg["device"])
        _, tokenizer, _ = shared_model(cfg["model"], device, cfg["dtype"])
        self.data, self.env_region = heldout_data(cfg, tokenizer)
        self.ctx = PruningContext(cfg["model"], device=device, dtype=cfg["dtype"], granularity=cfg["granularity"],
                                  method=cfg["method"], pattern=cfg["pattern"], data=self.data)
        self.agents = {}
        self.agent_configs = {}
        for agent_cfg in cfg["agents"]:
            agent = build_agent(agent_cfg)
            if hasattr(agent, "configure"):
                agent.configure(env_data=dict(cfg["data"]), workdir=workdir)
            self.agents[agent.name] = agent
            self.agent_configs[agent.name] = dict(agent_cfg) if isinstance(agent_cfg, dict) else {"name": agent_cfg}

    def header(self) -> dict:
        ctx = self.ctx
        return _jsonable({
            "schema_version": SCHEMA_VERSION, "model": ctx.spec,
            "operator": {"method": ctx.method, "pattern": ctx.pattern, "granularity": ctx.granularity},
            "data": ctx.describe(), "env_data": {**dict(self.cfg["data"]), "reward_slices": self.env_region},
            "dense": ctx.dense.as_dict(),
            "units": [{"name": u.name, "numel": u.numel} for u in ctx.units],
            "machine": {**machine_info(ctx.device), "backend": self.cfg["backend"]},
        })

    def deterministic(self) -> dict[str, bool]:
        return {label: bool(getattr(agent, "deterministic", False)) for label, agent in self.agents.items()}

    def run_cell(self, agent: str, target: float, seed: int) -> dict:
        """Allocate, prune, evaluate; never raises for a failing agent (the record says why)."""
        import torch

        from agents.base import check_allocation

        ctx = self.ctx
        record = new_record(agent, self.agent_configs.get(agent, {"name": agent}), target, seed)
        start = time.perf_counter()
        try:
            if agent not in self.agents:
                raise ValueError(f"agent {agent!r} is not configured: configured agents are {sorted(self.agents)}")
            random.seed(seed)
            torch.manual_seed(seed)
            impl = self.agents[agent]
            t0 = time.perf_counter()
            allocation = impl.allocate(ctx, float(target), int(seed))
            record["timings"]["allocate"] = time.perf_counter() - t0
            _agent_info(record, impl)
            allocation = check_allocation(ctx, allocation, float(target), who=f"agent {agent!r}")
            record["allocation"] = allocation
            t0 = time.perf_counter()
            ctx.prune(allocation)
            record["timings"]["prune"] = time.perf_counter() - t0
            record["achieved_sparsity"] = ctx.achieved_sparsity()
            t0 = time.perf_counter()
            metrics = ctx.evaluate().as_dict()
            record["timings"]["evaluate"] = time.perf_counter() - t0
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite metric(s) {bad}: {metrics}")
            record.update(metrics)
            record["status"], record["error"] = "ok", None
        except Exception as error:  # a failing cell never stops the others (KeyboardInterrupt does)
            record["status"] = "failed"
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc(limit=20)
            _agent_info(record, self.agents.get(agent))
            for key in ("ppl", "fact_acc", "fact_nll", "fact_retention"):
                record[key] = None
        finally:
            ctx.restore()
            record["seconds"] = time.perf_counter() - start
        return _jsonable(record)

    def export_cell(self, record: dict, directory: str | Path) -> dict:
        """Prune to the record's allocation and save model, tokenizer, masks, evaluation windows, meta;
        then `check_export` it. Written to a staging folder and renamed (never half-written)."""
        from safetensors.torch import save_file

        from prune_env.export import save_pruned
        from prune_env.files import staged_directory

        ctx = self.ctx
        try:
            with staged_directory(directory) as staging:
                ctx.prune(record["allocation"])
                save_pruned(ctx, staging)
                save_file({"windows": ctx.slices.evaluation.contiguous()}, str(staging / "evaluation.safetensors"))
                meta = {"record": record, "model": ctx.spec, "dtype": ctx.dtype, "batch_size": ctx.data.batch_size,
                        "data": ctx.describe(), "achieved_sparsity": ctx.achieved_sparsity()}
                (staging / "meta.json").write_text(json.dumps(_jsonable(meta), indent=2))
        finally:
            ctx.restore()
        return check_export(directory, device=ctx.device)


def _agent_info(record: dict, agent) -> None:
    """Copy the LLM fields an agent reports about its last allocate() into the record."""
    info = dict(getattr(agent, "last_info", None) or {})
    for key in ("llm_model", "iterations", "rollbacks", "llm", "rl"):
        if key in info:
            record[key] = info[key]


def check_export(directory: str | Path, device: str = "cpu", rtol: float = 1e-4) -> dict:
    """Reload an exported cell with transformers and recompute its perplexity on the saved evaluation
    windows; ok when it matches the record's ppl (relative tolerance `rtol`) and every masked weight
    of the reloaded model is zero."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prune_env.evaluation import perplexity
    from prune_env.models import DTYPES

    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=DTYPES[meta["dtype"]],
                                                 local_files_only=True).to(device).eval()
    windows = load_file(str(directory / "evaluation.safetensors"))["windows"]
    ppl = perplexity(model, windows, meta["batch_size"])
    masks = load_file(str(directory / "masks.safetensors"))
    modules = dict(model.named_modules())
    leaks = [name for name, keep in masks.items()
             if name in modules and bool((modules[name].weight.detach().cpu()[~keep.bool()] != 0).any())]
    missing = [name for name in masks if name not in modules]
    expected = meta["record"]["ppl"]
    ok = expected is not None and math.isclose(ppl, expected, rel_tol=rtol) and not leaks and not missing
    return {"dir": str(directory), "ppl": expected, "ppl_reloaded": ppl, "ok": bool(ok),
            "mask_leaks": leaks[:5], "missing_modules": missing[:5]}


# =========================================================================== records and results.json

_METRICS = ("ppl", "fact_acc", "fact_nll", "fact_retention")


def new_record(agent: str, agent_config: dict, target: float, seed: int) -> dict:
    return {"agent": agent, "agent_config": agent_config, "seed": int(seed), "target_sparsity": float(target),
            "achieved_sparsity": None, "ppl": None, "fact_acc": None, "fact_nll": None, "fact_retention": None,
            "allocation": None, "seconds": 0.0, "timings": {}, "status": "failed", "error": None,
            "llm_model": None, "iterations": None, "rollbacks": None, "reused_from_seed": None}


def validate_results(data: Any) -> None:
    """Raise ResultsError listing every violation of the results.json schema (module docstring)."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ResultsError(f"results must be a JSON object, got {type(data).__name__}")
    top = {"schema_version": is_int, "model": lambda v: isinstance(v, str),
           "operator": lambda v: isinstance(v, dict), "data": lambda v: isinstance(v, dict),
           "machine": lambda v: isinstance(v, dict), "records": lambda v: isinstance(v, list)}
    for key, ok in top.items():
        if key not in data:
            errors.append(f"missing top-level field {key!r}")
        elif not ok(data[key]):
            errors.append(f"top-level field {key!r} has the wrong type ({type(data[key]).__name__})")
    if data.get("schema_version") not in (None, SCHEMA_VERSION) and is_int(data.get("schema_version")):
        errors.append(f"schema_version {data['schema_version']} is not supported (expected {SCHEMA_VERSION})")
    if isinstance(data.get("operator"), dict):
        missing = {"method", "pattern", "granularity"} - set(data["operator"])
        if missing:
            errors.append(f"operator lacks {sorted(missing)}")
    if isinstance(data.get("machine"), dict):
        missing = {"platform", "cpu_count", "torch", "transformers", "device"} - set(data["machine"])
        if missing:
            errors.append(f"machine lacks {sorted(missing)}")
    n_units = len(data["units"]) if isinstance(data.get("units"), list) else None
    seen: dict[tuple, int] = {}
    for i, rec in enumerate(data.get("records") or [] if isinstance(data.get("records"), list) else []):
        errors.extend(_record_errors(i, rec, n_units, seen))
    if errors:
        shown = errors[:25] + ([f"... and {len(errors) - 25} more"] if len(errors) > 25 else [])
        raise ResultsError("invalid results:\n  - " + "\n  - ".join(shown))


def _record_errors(i: int, rec: Any, n_units: int | None, seen: dict) -> list[str]:
    if not isinstance(rec, dict):
        return [f"records[{i}] must be an object, got {type(rec).__name__}"]
    where = f"records[{i}] (agent={rec.get('agent')!r}, target={rec.get('target_sparsity')!r}, seed={rec.get('seed')!r})"
    errors = []
    required = ("agent", "seed", "target_sparsity", "achieved_sparsity", *_METRICS, "allocation", "seconds",
                "status", "error", "llm_model", "iterations", "rollbacks")
    for key in required:
        if key not in rec:
            errors.append(f"{where}: missing field {key!r}")
    if errors:
        return errors
    if not isinstance(rec["agent"], str) or not rec["agent"]:
        errors.append(f"{where}: 'agent' must be a non-empty string")
    if not is_int(rec["seed"]) or rec["seed"] < 0:
        errors.append(f"{where}: 'seed' must be a non-negative integer, got {rec['seed']!r}")
    if not is_finite_number(rec["target_sparsity"]) or not 0.0 < rec["target_sparsity"] < 1.0:
        errors.append(f"{where}: 'target_sparsity' must be a number in (0, 1), got {rec['target_sparsity']!r}")
    if not is_finite_number(rec["seconds"]) or rec["seconds"] < 0:
        errors.append(f"{where}: 'seconds' must be a non-negative number, got {rec['seconds']!r}")
    if rec["status"] not in ("ok", "failed"):
        errors.append(f"{where}: 'status' must be 'ok' or 'failed', got {rec['status']!r}")
    for key in ("llm_model",):
        if rec[key] is not None and not isinstance(rec[key], str):
            errors.append(f"{where}: {key!r} must be a string or null, got {rec[key]!r}")
    for key in ("iterations", "rollbacks"):
        if rec[key] is not None and (not is_int(rec[key]) or rec[key] < 0):
            errors.append(f"{where}: {key!r} must be a non-negative integer or null, got {rec[key]!r}")
    alloc = rec["allocation"]
    if alloc is not None:
        if not isinstance(alloc, list) or not all(is_finite_number(x) and 0.0 <= x < 1.0 for x in alloc):
            errors.append(f"{where}: 'allocation' must be a list of ratios in [0, 1) or null")
        elif n_units is not None and len(alloc) != n_units:
            errors.append(f"{where}: 'allocation' has {len(alloc)} ratios but there are {n_units} units")
    if rec["status"] == "ok":
        if rec["error"] is not None:
            errors.append(f"{where}: an ok record must have error null, got {rec['error']!r}")
        for key in _METRICS:
            if not is_finite_number(rec[key]):
                errors.append(f"{where}: ok record needs a finite number {key!r}, got {rec[key]!r}")
        if is_finite_number(rec["ppl"]) and rec["ppl"] <= 0:
            errors.append(f"{where}: 'ppl' must be positive, got {rec['ppl']!r}")
        for key in ("fact_acc", "fact_retention"):
            if is_finite_number(rec[key]) and not 0.0 <= rec[key] <= 1.0:
                errors.append(f"{where}: {key!r} must be in [0, 1], got {rec[key]!r}")
        if not is_finite_number(rec["achieved_sparsity"]) or not 0.0 <= rec["achieved_sparsity"] <= 1.0:
            errors.append(f"{where}: ok record needs 'achieved_sparsity' in [0, 1], got {rec['achieved_sparsity']!r}")
        if alloc is None:
            errors.append(f"{where}: ok record needs an 'allocation'")
    elif rec["status"] == "failed":
        if not isinstance(rec["error"], str) or not rec["error"].strip():
            errors.append(f"{where}: a failed record needs a non-empty 'error' string, got {rec['error']!r}")
        for key in _METRICS:
            if rec[key] is not None and not is_finite_number(rec[key]):
                errors.append(f"{where}: {key!r} must be a number or null, got {rec[key]!r}")
    if not errors:
        key = cell_key(rec["agent"], rec["target_sparsity"], rec["seed"])
        if key in seen:
            errors.append(f"{where}: duplicate of records[{seen[key]}] (same agent, target, seed)")
        seen[key] = i
    return errors


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error}") from None
    try:
        validate_results(data)
    except ResultsError as error:
        raise ResultsError(f"{path}: {error}") from None
    return data


def write_results(path: str | Path, data: dict) -> None:
    """Validate, then write via a temporary file in the same folder + os.replace (atomic)."""
    validate_results(data)
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))


_COMPARED = ("model", "operator", "units")


def _comparable_data(data: dict) -> dict:
    return {k: v for k, v in (data or {}).items() if k not in ("device",)}


def check_resumable(old: dict, header: dict, path: Path) -> None:
    diffs = [k for k in _COMPARED if old.get(k) != header.get(k)]
    if _comparable_data(old.get("data")) != _comparable_data(header.get("data")):
        diffs.append("data")
    if diffs:
        raise ResultsError(f"cannot resume {path}: it was made with a different {', '.join(diffs)}; "
                           "use a new --out folder or the original config")


@dataclass
class Cell:
    agent: str
    target: float
    seed: int
    reuse_from: int | None = None  # seed of the record this deterministic cell copies

    @property
    def key(self):
        return cell_key(self.agent, self.target, self.seed)


def plan_cells(labels: list[str], targets: list[float], seeds: list[int], deterministic: dict[str, bool],
               reuse: bool = True) -> list[Cell]:
    cells = []
    for agent in labels:
        for target in targets:
            for k, seed in enumerate(seeds):
                reuse_from = seeds[0] if reuse and deterministic.get(agent) and k > 0 else None
                cells.append(Cell(agent, float(target), int(seed), reuse_from))
    return cells


class Store:
    """results.json in memory: records keyed by cell, rewritten atomically on every change."""

    def __init__(self, path: Path, header: dict, config: dict, plan: list[Cell], previous: dict | None = None,
                 agent_configs: dict[str, dict] | None = None):
        self.path, self.plan = path, plan
        self.agent_configs = _jsonable(agent_configs or {})
        self.data = {**header, "config": _jsonable(config), "created": _now(), "updated": _now(), "exports": [],
                     "records": []}
        self.records: dict[tuple, dict] = {}
        if previous is not None:
            self.data["created"] = previous.get("created", self.data["created"])
            self.data["exports"] = list(previous.get("exports") or [])
            for rec in previous["records"]:
                self.records[cell_key(rec["agent"], rec["target_sparsity"], rec["seed"])] = rec

    def done(self, cell: Cell) -> bool:
        """An ok record made with the agent's current config (a changed config is recomputed)."""
        rec = self.records.get(cell.key)
        if rec is None or rec["status"] != "ok":
            return False
        return rec.get("agent_config") == self.agent_configs.get(cell.agent, rec.get("agent_config"))

    def get(self, agent: str, target: float, seed: int) -> dict | None:
        return self.records.get(cell_key(agent, target, seed))

    def add(self, record: dict) -> None:
        self.records[cell_key(record["agent"], record["target_sparsity"], record["seed"])] = record
        self.fill_copies()
        self.write()

    def fill_copies(self) -> None:
        for cell in self.plan:
            if cell.reuse_from is None or self.done(cell):
                continue
            source = self.get(cell.agent, cell.target, cell.reuse_from)
            if source is not None and source.get("reused_from_seed") is None:
                copy_ = {**copy.deepcopy(source), "seed": cell.seed, "seconds": 0.0, "timings": {},
                         "reused_from_seed": cell.reuse_from}
                self.records[cell.key] = copy_

    def write(self) -> None:
        order = {cell.key: i for i, cell in enumerate(self.plan)}
        keys = sorted(self.records, key=lambda k: (order.get(k, len(order)), ))
        self.data["records"] = [self.records[k] for k in keys]
        self.data["updated"] = _now()
        write_results(self.path, self.data)


# =========================================================================== backends


def _todo(plan: list[Cell], store: Store) -> list[Cell]:
    return [cell for cell in plan if cell.reuse_from is None and not store.done(cell)]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe_record(rec: dict) -> str:
    if rec["status"] == "ok":
        return (f"{rec['agent']} t={rec['target_sparsity']:g} s={rec['seed']}: ppl {rec['ppl']:.3f} "
                f"acc {rec['fact_acc']:.3f} ret {rec['fact_retention']:.3f} ({rec['seconds']:.1f}s)")
    return f"{rec['agent']} t={rec['target_sparsity']:g} s={rec['seed']}: FAILED {rec['error']}"


class SerialBackend:
    def __init__(self, cfg: dict, out: Path):
        self.runner = Runner(cfg, out)

    def header(self) -> dict:
        return self.runner.header()

    def deterministic(self) -> dict[str, bool]:
        return self.runner.deterministic()

    def run(self, cells: list[Cell], store: Store) -> None:
        for cell in cells:
            record = self.runner.run_cell(cell.agent, cell.target, cell.seed)
            store.add(record)
            _log(_describe_record(record))

    def export(self, record: dict, directory: Path) -> dict:
        return self.runner.export_cell(record, directory)

    def close(self) -> None:
        pass


class RayBackend:
    """Cells as tasks on Ray actors (each actor = one process with one model load)."""

    def __init__(self, cfg: dict, out: Path):
        try:
            import ray
        except ImportError:
            raise ValueError("backend 'ray' needs Ray: pip install 'ray[default]' (or pip install -e '.[ray]')") from None
        self.ray = ray
        opts = cfg["ray"]
        n_workers = int(opts["num_workers"])
        if n_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {n_workers}")
        device = resolve_device(cfg["device"])
        gpus = opts["num_gpus_per_worker"]
        if gpus == "auto":
            gpus = 1 if device.startswith("cuda") else 0
        cfg = {**cfg, "device": device}
        self._started = False
        self.actors: list = []
        try:
            if not ray.is_initialized():
                runtime_env = opts["runtime_env"]
                init: dict[str, Any] = {"address": opts["address"]}
                if opts["address"] is None:  # a local instance: this checkout on the workers' path
                    if runtime_env is None:
                        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
                        runtime_env = {"env_vars": {"PYTHONPATH": path}}
                    init["include_dashboard"] = False
                    if opts["num_cpus"] is not None:
                        init["num_cpus"] = int(opts["num_cpus"])
                if runtime_env is not None:
                    init["runtime_env"] = runtime_env
                ray.init(**init)
                self._started = True
            self.actor_cls = ray.remote(Runner).options(num_cpus=opts["num_cpus_per_worker"], num_gpus=gpus)
            self.cfg, self.out = cfg, out
            self.actors = [self.actor_cls.remote(cfg, str(out)) for _ in range(n_workers)]
            self._header = ray.get(self.actors[0].header.remote())
            self._deterministic = ray.get(self.actors[0].deterministic.remote())
        except BaseException:
            self.close()
            raise

    def header(self) -> dict:
        return self._header

    def deterministic(self) -> dict[str, bool]:
        return self._deterministic

    def run(self, cells: list[Cell], store: Store) -> None:
        ray = self.ray
        queue = list(cells)
        running: dict = {}  # ObjectRef -> (actor index, cell)

        def submit(index: int) -> None:
            if queue:
                cell = queue.pop(0)
                ref = self.actors[index].run_cell.remote(cell.agent, cell.target, cell.seed)
                running[ref] = (index, cell)

        for index in range(len(self.actors)):
            submit(index)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            index, cell = running.pop(done[0])
            try:
                record = ray.get(done[0])
            except Exception as error:  # the actor died (e.g. out of memory): record it, start a new one
                record = new_record(cell.agent, {"name": cell.agent}, cell.target, cell.seed)
                record["error"] = f"{type(error).__name__}: {error}"
                self.actors[index] = self.actor_cls.remote(self.cfg, str(self.out))
            store.add(record)
            _log(_describe_record(record))
            submit(index)

    def export(self, record: dict, directory: Path) -> dict:
        return self.ray.get(self.actors[0].export_cell.remote(record, str(directory)))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self._started:
            self.ray.shutdown()


# =========================================================================== report


def _stats(values: list[float]) -> tuple[float, float]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(data: dict) -> list[dict]:
    """Mean and sample std over seeds of every ok (agent, target), in record order."""
    groups: dict[tuple, list[dict]] = {}
    for rec in data["records"]:
        groups.setdefault((rec["agent"], round(rec["target_sparsity"], 9)), []).append(rec)
    rows = []
    for (agent, target), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        row = {"agent": agent, "target": target, "n_ok": len(ok), "n_failed": len(recs) - len(ok)}
        for key in (*_METRICS, "achieved_sparsity"):
            if ok:
                row[key] = _stats([r[key] for r in ok])
        computed = [r["seconds"] for r in ok if r.get("reused_from_seed") is None]
        if computed:
            row["seconds"] = _stats(computed)
        if ok:
            import numpy as np

            row["allocation"] = np.mean([r["allocation"] for r in ok], axis=0).tolist()
        rows.append(row)
    return rows


def _fmt(pair, digits=3) -> str:
    if pair is None:
        return "-"
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(data: dict, out: str | Path, allocation_target: float | None = None) -> Path:
    """report.md with one table per target sparsity and the three plots (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = summarise(data)
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    by = {(r["agent"], r["target"]): r for r in rows}
    dense = data.get("dense") or {}
    d = data["data"]
    text = d.get("text", {})
    lines = [f"# Benchmark: {data['model']}", "",
             f"- operator: {data['operator']['method']}"
             f"{' ' + data['operator']['pattern'] if data['operator'].get('pattern') else ''}, "
             f"granularity {data['operator']['granularity']}, {len(data.get('units') or [])} units",
             f"- evaluation: {text.get('evaluation', {}).get('tokens', '?')} tokens of {text.get('source')!r} "
             f"(region {text.get('evaluation', {}).get('region')}), {d.get('facts', {}).get('n', '?')} facts "
             f"(offset {d.get('facts', {}).get('offset')}) of {d.get('facts', {}).get('source')!r}",
             f"- calibration: {text.get('calibration', {}).get('samples')} x "
             f"{text.get('calibration', {}).get('seq_len')} tokens; seeds change only the agents",
             f"- machine: {data['machine'].get('platform')}, {data['machine'].get('cpu_count')} CPUs, "
             f"torch {data['machine'].get('torch')}, transformers {data['machine'].get('transformers')}, "
             f"device {data['machine'].get('device')}",
             f"- dense: ppl {dense.get('ppl', float('nan')):.3f}, fact acc {dense.get('fact_acc', float('nan')):.3f}",
             "", "Cells show mean ± sample std over the ok seeds.", ""]
    for target in targets:
        lines += [f"## Target sparsity {target:g}", "",
                  "| agent | ok/failed | ppl | fact acc | retention | fact nll | achieved | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for agent in agents:
            r = by.get((agent, target))
            if r is None:
                continue
            lines.append(f"| {agent} | {r['n_ok']}/{r['n_failed']} | {_fmt(r.get('ppl'))} | "
                         f"{_fmt(r.get('fact_acc'))} | {_fmt(r.get('fact_retention'))} | {_fmt(r.get('fact_nll'))} | "
                         f"{_fmt(r.get('achieved_sparsity'), 4)} | {_fmt(r.get('seconds'), 1)} |")
        lines.append("")
    failed = [rec for rec in data["records"] if rec["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {rec['agent']} t={rec['target_sparsity']:g} seed {rec['seed']}: "
                  f"`{str(rec['error']).splitlines()[0][:300]}`" for rec in failed]
        lines.append("")
    llm = [rec for rec in data["records"] if rec.get("llm_model") and rec["status"] == "ok"]
    if llm:
        lines += ["## LLM runs", "", "| agent | target | seed | model | iterations | rollbacks |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['agent']} | {r['target_sparsity']:g} | {r['seed']} | {r['llm_model']} | "
                  f"{r['iterations']} | {r['rollbacks']} |" for r in llm]
        lines.append("")
    if data.get("exports"):
        lines += ["## Exports", ""]
        lines += [f"- {e.get('cell')}: `{e.get('dir')}` " + (f"FAILED `{e['error']}`" if e.get("error") else
                  f"ppl {e.get('ppl')} reloaded {e.get('ppl_reloaded')} {'ok' if e.get('ok') else 'MISMATCH'}")
                  for e in data["exports"]]
        lines.append("")

    plots = []
    ok_targets = [t for t in targets if any(by[(a, t)].get("allocation") for a in agents if (a, t) in by)]
    if ok_targets:
        chosen = ok_targets if allocation_target is None else [min(ok_targets, key=lambda t: abs(t - allocation_target))]
        for target in chosen:
            fig, ax = plt.subplots(figsize=(9, 4))
            for agent in agents:
                r = by.get((agent, target))
                if r and r.get("allocation"):
                    ax.plot(range(len(r["allocation"])), r["allocation"], marker="o", ms=3, label=agent)
            ax.axhline(target, color="grey", lw=0.8, ls="--")
            ax.set(xlabel="unit (model order)", ylabel="sparsity", title=f"Per-unit allocation at target {target:g}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"allocation_t{target:g}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            plots.append(name)

        fig, ax = plt.subplots(figsize=(6, 4))
        for agent in agents:
            pts = [(t, by[(agent, t)]["ppl"]) for t in targets if (agent, t) in by and by[(agent, t)].get("ppl")]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                            marker="o", capsize=3, label=agent)
        if dense.get("ppl"):
            ax.axhline(dense["ppl"], color="grey", lw=0.8, ls="--", label="dense")
        ax.set(xlabel="target sparsity", ylabel="perplexity", yscale="log", title="Perplexity vs sparsity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_sparsity.png", dpi=110)
        plt.close(fig)
        plots.append("ppl_vs_sparsity.png")

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "fact_acc", "Fact accuracy"), (axes[1], "fact_retention", "Fact retention")):
            for agent in agents:
                pts = [(t, by[(agent, t)][key]) for t in targets if (agent, t) in by and by[(agent, t)].get(key)]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                                marker="o", capsize=3, label=agent)
            if key == "fact_acc" and dense.get("fact_acc") is not None:
                ax.axhline(dense["fact_acc"], color="grey", lw=0.8, ls="--", label="dense")
            ax.set(xlabel="target sparsity", ylabel=key, title=f"{title} vs sparsity")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "facts_vs_sparsity.png", dpi=110)
        plt.close(fig)
        plots.append("facts_vs_sparsity.png")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# =========================================================================== driver


def run_benchmark(cfg: dict, resume: bool = False, backend=None) -> dict:
    """Run (or finish) the grid of `cfg` into cfg['out']; returns the final results dict."""
    agents = check_config(cfg)
    labels = [agent.name for agent in agents]
    agent_configs = {label: (dict(c) if isinstance(c, dict) else {"name": c}) for label, c in zip(labels, cfg["agents"])}
    out = Path(cfg["out"])
    path = out / "results.json"
    previous = None
    if path.exists():
        if not resume:
            raise FileExistsError(f"{path} already exists: pass --resume to finish it, or choose a new --out")
        previous = load_results(path)
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or (RayBackend if cfg["backend"] == "ray" else SerialBackend)(cfg, out)
    try:
        header = backend.header()
        if previous is not None:
            check_resumable(previous, header, path)
        plan = plan_cells(labels, cfg["targets"], cfg["seeds"], backend.deterministic(), cfg["reuse_deterministic"])
        store = Store(path, header, cfg, plan, previous, agent_configs)
        store.fill_copies()
        store.write()
        todo = _todo(plan, store)
        done = sum(store.done(cell) for cell in plan)
        _log(f"benchmark: {len(plan)} cells, {done} already done, {len(todo)} to compute ({cfg['backend']})")
        backend.run(todo, store)
        for item in cfg["export"] or []:
            rec = store.get(item["agent"], item["target"], item["seed"])
            name = cell_name(item["agent"], item["target"], item["seed"])
            if rec is None or rec["status"] != "ok":
                entry = {"cell": name, "dir": None, "ok": False, "error": "no ok record for this cell"}
            else:
                try:
                    entry = {"cell": name, **backend.export(rec, out / "export" / name)}
                except Exception as error:  # an export problem never loses the grid or the report
                    entry = {"cell": name, "dir": str(out / "export" / name), "ok": False,
                             "error": f"{type(error).__name__}: {error}"}
                    _log(f"export {name} failed: {entry['error']}")
            store.data["exports"] = [e for e in store.data["exports"] if e.get("cell") != name] + [_jsonable(entry)]
            store.write()
    finally:
        backend.close()
    write_report(store.data, out, cfg["report"]["allocation_target"])
    return store.data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmark.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default configs/benchmark.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. targets=[0.5] backend=ray")
    parser.add_argument("--eval-text", default=None, help="text source for calibration and evaluation (data.text)")
    parser.add_argument("--facts", default=None, help="facts source: offline, FILE.jsonl, freebaseqa (data.facts)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's out)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted results.json in --out")
    parser.add_argument("--export", action="append", default=[], metavar="AGENT:TARGET:SEED",
                        help="save this cell's pruned model and masks into OUT/export/<cell> and check it")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and plots from results.json")
    parser.add_argument("--check-export", default=None, metavar="DIR", help="reload an exported cell, check its ppl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.check_export:
            result = check_export(args.check_export)
            print(json.dumps(result, indent=2))
            return 0 if result["ok"] else 1
        cfg = load_benchmark_config(args.config, args.overrides, eval_text=args.eval_text, facts=args.facts,
                                    out=args.out, export=args.export)
        if args.report_only:
            data = load_results(Path(cfg["out"]) / "results.json")
            print(f"wrote {write_report(data, cfg['out'], cfg['report']['allocation_target'])}")
            return 0
        data = run_benchmark(cfg, resume=args.resume)
    except KeyboardInterrupt:
        print("interrupted: finished cells are in results.json; rerun with --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sum(r["status"] == "failed" for r in data["records"])
    print(f"{len(data['records'])} records ({failed} failed) in {Path(cfg['out']) / 'results.json'}; "
          f"report {Path(cfg['out']) / 'report.md'}")
    return 0


if __name__ == "__main__":
    # Run as the importable module `benchmark`, so Ray pickles Runner by reference, not from __main__.
    sys.path.insert(0, str(ROOT))
    import benchmark as _module

    sys.exit(_module.main())
