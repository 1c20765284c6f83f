"""The benchmark run: the grid of cells into one output folder, which it holds locked from start to end.

Everything checkable without the model (config, agents, RL policy paths, the output folder) is
checked before the folder is touched; a run that fails before writing a record leaves no folder it
created behind. A second run on the same folder fails at once (OutputLockedError), so two runs can
never interleave their records in one results.json.
"""

from __future__ import annotations

from pathlib import Path

from prune_env.files import LOCK_NAME, output_lock

from .backfill import backfill_knowledge, needs_backfill
from .bench_config import BenchmarkConfig
from .executors import RayBackend, SerialBackend, log
from .report import write_report
from .runner import build_agents
from .store import Store, cell_name, check_resumable, load_results, plan_cells, write_results

LOCK_WHAT = "benchmark output folder"


def run_benchmark(config: BenchmarkConfig, resume: bool = False) -> dict:
    """Run (or, with `resume`, finish) the grid of `config` into config.out; returns the results dict."""
    agents = build_agents(config)
    out = config.out_dir
    created = not out.exists()
    try:
        with output_lock(out, LOCK_WHAT):
            return _run_locked(config, agents, resume)
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise


def _run_locked(config: BenchmarkConfig, agents: dict, resume: bool) -> dict:
    out = config.out_dir
    path = out / "results.json"
    previous = None
    if path.exists():
        if not resume:
            raise FileExistsError(f"{path} already exists: pass --resume to finish it, or choose a new --out")
        previous = load_results(path)
    backend = (RayBackend if config.backend == "ray" else SerialBackend)(config, out, agents)
    try:
        header = backend.header()
        if previous is not None:
            check_resumable(previous, header, path)
        deterministic = {label: agent.deterministic for label, agent in agents.items()}
        plan = plan_cells(list(agents), config.targets, config.seeds, deterministic, config.reuse_deterministic)
        agent_configs = dict(zip(agents, config.agents))
        store = Store(path, header, config.to_dict(), plan, previous, agent_configs)
        store.fill_copies()
        store.write()
        todo = store.todo()
        done = sum(store.done(cell) for cell in plan)
        log(f"benchmark: {len(plan)} cells, {done} already done, {len(todo)} to compute ({config.backend})")
        backend.run(todo, store)
        for item in config.export:
            store.set_export(_export(backend, store, out, item.agent, item.target, item.seed))
    finally:
        backend.close()
    write_report(store.data, out, config.report.allocation_target)
    return store.data


def _export(backend, store: Store, out: Path, agent: str, target: float, seed: int) -> dict:
    name = cell_name(agent, target, seed)
    rec = store.get(agent, target, seed)
    if rec is None or rec["status"] != "ok":
        return {"cell": name, "dir": None, "ok": False, "error": "no ok record for this cell"}
    try:
        return {"cell": name, **backend.export(rec, out / "export" / name)}
    except Exception as error:  # an export problem never loses the grid or the report
        entry = {"cell": name, "dir": str(out / "export" / name), "ok": False, "error": f"{type(error).__name__}: {error}"}
        log(f"export {name} failed: {entry['error']}")
        return entry


def report_only(config: BenchmarkConfig) -> Path:
    """Rewrite report.md and the plots from the results.json in config.out (adding the balanced knowledge
    metric to a file measured before it, from its own per-fact flags: prune_bench/backfill.py)."""
    path = config.out_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {str(config.out_dir)!r}: run the benchmark first or give --out")
    with output_lock(config.out_dir, LOCK_WHAT):
        data = load_results(path)
        if needs_backfill(data):  # a file from before the balanced knowledge metric gains it from its flags
            data = backfill_knowledge(data)
            write_results(path, data)
        return write_report(data, config.out_dir, config.report.allocation_target)


def _remove_if_empty(out: Path) -> None:
    """Remove a folder this run created when nothing but its lock file is in it."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
        (out / LOCK_NAME).unlink(missing_ok=True)
        out.rmdir()
