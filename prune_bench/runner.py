"""One worker of the benchmark: one model, one PruningContext and the agents, built once per process.

Used in-process by the serial backend and as a Ray actor (each actor is one process with one model).
A cell = `agent.allocate(ctx, target, seed)` (agents that play an env get a context built on the env's
own data instead, so they never see held-out data), the exact sequential prune `ctx.prune`, and the
held-out evaluation, which also keeps per window the summed NLL and token count and per fact whether it was
answered (multiple choice) and greedy-exact: what the paired bootstrap intervals resample.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
import traceback
from pathlib import Path

import torch

from agents.base import Agent, build_agent, check_allocation
from prune_env.context import PruningContext, load_template
from prune_env.data.corpus import load_text
from prune_env.data.windows import tokenize_corpus
from prune_env.data.evaluation import evaluate_facts, perplexity, window_nll
from prune_env.files import atomic_write_json, staged_directory, to_jsonable
from prune_env.validation import check_device

from .bench_config import BenchmarkConfig
from .heldout import heldout_data
from .store import SCHEMA_VERSION, new_record, redact_secrets


def build_agents(config: BenchmarkConfig) -> dict[str, Agent]:
    """label -> agent, from the config's agent list; distinct labels are required."""
    agents: dict[str, Agent] = {}
    for agent_config in config.agents:
        agent = build_agent(agent_config)
        if agent.name in agents:
            raise ValueError(f"agent label {agent.name!r} appears more than once: give each agent a distinct 'label'")
        agents[agent.name] = agent
    return agents


def machine_info(device: str) -> dict:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "torch_threads": torch.get_num_threads(), "cuda_device": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return info


class Runner:
    """Runs cells on one context. `agents` (label -> Agent) are built here unless the caller built them."""

    def __init__(self, config: BenchmarkConfig, workdir: str | Path | None = None,
                 agents: dict[str, Agent] | None = None):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.agents = build_agents(config) if agents is None else agents
        self.agent_configs = {agent.name: redact_secrets(dict(c))  # records never carry a key
                              for agent, c in zip(self.agents.values(), config.agents)}
        device = check_device(config.device)
        _, tokenizer = load_template(config.model, device, config.dtype)
        held = heldout_data(config, tokenizer, tokenize_corpus(load_text(config.data.text), tokenizer))
        self.reward_slices = held.reward_slices
        operator = {"granularity": config.granularity, "method": config.method, "pattern": config.pattern}
        self.ctx = PruningContext(config.model, device=device, dtype=config.dtype, data=held.data, **operator)
        # Agents that play an env (RL policies, the iterative LLM agent's rollbacks, search) decide on a
        # context built on the env's own data, so they never see the held-out text and facts; it is built
        # on first use. Allocation rules read only the dense weights, calibration statistics and profile
        # of the context the benchmark prunes, `self.ctx`.
        self.operator = operator
        self._env_ctx: PruningContext | None = None
        env_data = config.to_dict()["data"]
        for agent in self.agents.values():
            agent.configure(env_data=env_data, workdir=workdir)

    def header(self) -> dict:
        ctx = self.ctx
        return to_jsonable({
            "schema_version": SCHEMA_VERSION, "model": ctx.spec,
            "operator": {"method": ctx.method, "pattern": ctx.pattern, "granularity": ctx.granularity},
            "data": ctx.describe(), "env_data": {**self.config.to_dict()["data"], "reward_slices": self.reward_slices},
            "dense": ctx.dense.as_dict(), "dense_per_fact": {"greedy_exact": list(ctx.dense.greedy_exact),
                                                             "relation": [f.relation for f in ctx.facts],
                                                             "answer": [f.answer for f in ctx.facts]},
            "knowledge_baseline": ctx.knowledge_baseline.as_dict(),
            "units": [{"name": u.name, "numel": u.numel} for u in ctx.units],
            "machine": {**machine_info(ctx.device), "backend": self.config.backend},
        })

    def env_context(self) -> PruningContext:
        """The context lent to agents that play an env: the env's own data (its reward slices)."""
        if self._env_ctx is None:
            self._env_ctx = PruningContext(self.config.model, device=self.ctx.device, dtype=self.config.dtype,
                                           data=self.config.data, **self.operator)
        return self._env_ctx

    def deterministic(self) -> dict[str, bool]:
        return {label: agent.deterministic for label, agent in self.agents.items()}

    def evaluate(self) -> tuple[dict, dict, dict]:
        """The held-out metrics of the model as it is now, plus the per-window and per-fact values."""
        ctx = self.ctx
        windows = window_nll(ctx.model, ctx.slices.evaluation, ctx.data.batch_size)
        facts = evaluate_facts(ctx.model, ctx.tokenizer, ctx.facts, ctx.data.fact_batch_size)
        metrics = ctx.metrics(windows.ppl, facts).as_dict()
        per_window = {"nll": windows.nll, "tokens": windows.tokens}
        per_fact = {"correct": list(facts.correct), "greedy_exact": list(facts.greedy_exact),
                    "answer_nll": [round(x, 5) for x in facts.answer_nll]}
        return metrics, per_window, per_fact

    def run_cell(self, agent: str, target: float, seed: int) -> dict:
        """Allocate, prune, evaluate; never raises for a failing agent (the record says why)."""
        ctx = self.ctx
        record = new_record(agent, self.agent_configs.get(agent, {"name": agent}), target, seed)
        start = time.perf_counter()
        impl = self.agents.get(agent)
        try:
            if impl is None:
                raise ValueError(f"agent {agent!r} is not configured: configured agents are {sorted(self.agents)}")
            random.seed(seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            allocation = impl.allocate(self.env_context() if impl.plays_env else ctx, float(target), int(seed))
            record["timings"]["allocate"] = time.perf_counter() - t0
            _agent_info(record, impl)
            allocation = check_allocation(ctx, allocation, float(target), who=f"agent {agent!r}")
            record["allocation"] = allocation
            t0 = time.perf_counter()
            ctx.prune(allocation)
            record["timings"]["prune"] = time.perf_counter() - t0
            record["achieved_sparsity"] = ctx.achieved_sparsity()
            t0 = time.perf_counter()
            metrics, per_window, per_fact = self.evaluate()
            record["timings"]["evaluate"] = time.perf_counter() - t0
            bad = [k for k, v in metrics.items()
                   if not all(math.isfinite(x) for x in (v.values() if isinstance(v, dict) else [v]))]
            if bad:
                raise FloatingPointError(f"non-finite metric(s) {bad}: {metrics}")
            record.update(metrics, per_window=per_window, per_fact=per_fact, status="ok", error=None)
        except Exception as error:  # a failing cell never stops the others (KeyboardInterrupt does)
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=20), ppl=None, fact_acc=None, fact_nll=None,
                          fact_retention=None, fact_retention_balanced=None, fact_acc_balanced=None,
                          fact_answer_ppl_balanced=None, retention_by_relation=None, per_window=None, per_fact=None)
            if impl is not None:
                _agent_info(record, impl)
        finally:
            ctx.restore()
            if self._env_ctx is not None:
                self._env_ctx.restore()
            record["seconds"] = time.perf_counter() - start
        return to_jsonable(record)

    def export_cell(self, record: dict, directory: str | Path) -> dict:
        """Prune to the record's allocation and save model, tokenizer, masks, evaluation windows, meta;
        then `check_export` it. Written to a staging folder and renamed (never half-written)."""
        from safetensors.torch import save_file

        from prune_env.pruning.export import save_pruned

        ctx = self.ctx
        try:
            with staged_directory(directory) as staging:
                ctx.prune(record["allocation"])
                save_pruned(ctx, staging)
                save_file({"windows": ctx.slices.evaluation.contiguous()}, str(staging / "evaluation.safetensors"))
                meta = {"record": record, "model": ctx.spec, "dtype": ctx.dtype, "batch_size": ctx.data.batch_size,
                        "data": ctx.describe(), "achieved_sparsity": ctx.achieved_sparsity()}
                atomic_write_json(staging / "meta.json", meta)
        finally:
            ctx.restore()
        return check_export(directory, device=ctx.device)


_AGENT_FIELDS = ("llm_model", "iterations", "rollbacks", "llm", "rl", "search")


def _agent_info(record: dict, agent: Agent) -> None:
    """Copy what an agent reports about its last allocate() (LLM and RL details) into the record."""
    record.update({key: value for key, value in agent.last_info.items() if key in _AGENT_FIELDS})


def check_export(directory: str | Path, device: str = "cpu", rtol: float = 1e-4) -> dict:
    """Reload an exported cell with transformers and recompute its perplexity on the saved evaluation
    windows; ok when it matches the record's ppl (relative tolerance `rtol`) and every masked weight
    of the reloaded model is zero."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prune_env.models import DTYPES, refuse_remote_code

    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    refuse_remote_code(directory / "model", str(directory))  # an exported folder never runs its own code
    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=DTYPES[meta["dtype"]],
                                                 local_files_only=True, trust_remote_code=False).to(device).eval()
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
