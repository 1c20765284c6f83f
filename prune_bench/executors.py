"""Where cells run: `SerialBackend` in this process, `RayBackend` on Ray actors.

Both run the same `Runner.run_cell`, so records are identical for the same seeds as long as torch uses
the same number of threads (`threads:`; Ray workers default to their num_cpus). The driver builds the
agents once (labels, determinism); a Ray actor is a separate process and builds its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agents.base import Agent
from prune_env.validation import check_device

from .bench_config import ROOT, BenchmarkConfig
from .runner import Runner
from .store import Cell, Store, new_record


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe_record(rec: dict) -> str:
    if rec["status"] == "ok":
        return (f"{rec['agent']} t={rec['target_sparsity']:g} s={rec['seed']}: ppl {rec['ppl']:.3f} "
                f"acc {rec['fact_acc']:.3f} ret {rec['fact_retention']:.3f} ({rec['seconds']:.1f}s)")
    return f"{rec['agent']} t={rec['target_sparsity']:g} s={rec['seed']}: FAILED {rec['error']}"


class SerialBackend:
    """Cells one after the other on one Runner in this process."""

    def __init__(self, config: BenchmarkConfig, out: Path, agents: dict[str, Agent]):
        self.runner = Runner(config, out, agents)

    def header(self) -> dict:
        return self.runner.header()

    def run(self, cells: list[Cell], store: Store) -> None:
        for cell in cells:
            record = self.runner.run_cell(cell.agent, cell.target, cell.seed)
            store.add(record)
            log(describe_record(record))

    def export(self, record: dict, directory: Path) -> dict:
        return self.runner.export_cell(record, directory)

    def close(self) -> None:
        pass


class RayBackend:
    """Cells as tasks on Ray actors (each actor = one process with one model load)."""

    def __init__(self, config: BenchmarkConfig, out: Path, agents: dict[str, Agent]):
        try:
            import ray
        except ImportError:
            raise ValueError("backend='ray' needs Ray: pip install 'ray[default]' (or pip install -e '.[ray]')") from None
        self.ray = ray
        opts = config.ray
        device = check_device(config.device)
        gpus = (1 if device.startswith("cuda") else 0) if opts.num_gpus_per_worker == "auto" else opts.num_gpus_per_worker
        self.config, self.out = config, out
        self._started = False
        self.actors: list = []
        try:
            if not ray.is_initialized():
                init: dict[str, Any] = {"address": opts.address}
                runtime_env = opts.runtime_env
                if opts.address is None:  # a local instance: this checkout on the workers' path
                    if runtime_env is None:
                        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
                        runtime_env = {"env_vars": {"PYTHONPATH": path}}
                    init["include_dashboard"] = False
                    if opts.num_cpus is not None:
                        init["num_cpus"] = opts.num_cpus
                if runtime_env is not None:
                    init["runtime_env"] = runtime_env
                ray.init(**init)
                self._started = True
            self.actor_cls = ray.remote(Runner).options(num_cpus=opts.num_cpus_per_worker, num_gpus=gpus)
            self.actors = [self.actor_cls.remote(config, str(out)) for _ in range(opts.num_workers)]
            self._header = ray.get(self.actors[0].header.remote())
        except BaseException:
            self.close()
            raise

    def header(self) -> dict:
        return self._header

    def run(self, cells: list[Cell], store: Store) -> None:
        queue = list(cells)
        running: dict = {}  # ObjectRef -> (actor index, cell)

        def submit(index: int) -> None:
            if queue:
                cell = queue.pop(0)
                running[self.actors[index].run_cell.remote(cell.agent, cell.target, cell.seed)] = (index, cell)

        for index in range(len(self.actors)):
            submit(index)
        while running:
            done, _ = self.ray.wait(list(running), num_returns=1)
            index, cell = running.pop(done[0])
            try:
                record = self.ray.get(done[0])
            except Exception as error:  # the actor died (e.g. out of memory): record it, start a new one
                record = new_record(cell.agent, {"name": cell.agent}, cell.target, cell.seed)
                record["error"] = f"{type(error).__name__}: {error}"
                self.actors[index] = self.actor_cls.remote(self.config, str(self.out))
            store.add(record)
            log(describe_record(record))
            submit(index)

    def export(self, record: dict, directory: Path) -> dict:
        return self.ray.get(self.actors[0].export_cell.remote(record, str(directory)))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self._started:
            self.ray.shutdown()
