"""benchmark.py / prune_bench on tiny-llama: serial grid, schema, resume, failing cells, export, Ray == serial."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import socket
from pathlib import Path

import pytest
import torch

import benchmark
from prune_bench.bench_config import DEFAULT_CONFIG, BenchmarkConfig, defaults, load_benchmark_config
from prune_bench.driver import run_benchmark
from prune_bench.heldout import heldout_data
from prune_bench.runner import Runner, check_export
from prune_bench.store import ResultsError, validate_results
from prune_env.config_files import merge
from agents.base import Agent
from prune_env.context import PruningContext

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, text_file):
    """A scratch folder and conftest's generated text (conftest also isolates the cache for the session)."""
    old_threads = torch.get_num_threads()
    yield {"root": tmp_path_factory.mktemp("bench"), "text": str(text_file)}
    torch.set_num_threads(old_threads)  # the benchmark configs below set threads=1


def make_config(ws, out, **changes) -> BenchmarkConfig:
    base = {
        "model": "tiny-llama", "device": "cpu", "threads": 1, "targets": [0.3, 0.5], "seeds": [0],
        "agents": [{"name": "uniform"}, {"name": "owl"}],
        "data": {"text": ws["text"], "calib_samples": 4, "calib_seq_len": 32, "eval_tokens": 256,
                 "eval_seq_len": 64, "n_facts": 20, "grad_samples": 2},
        "heldout": {"eval_tokens": 512, "eval_seq_len": 64, "n_facts": 40},
        "out": str(ws["root"] / out),
    }
    return BenchmarkConfig.from_dict(merge(defaults(), merge(base, changes)))


@pytest.fixture(scope="module")
def grid(workspace):
    cfg = make_config(workspace, "grid", export=[{"agent": "owl", "target": 0.5, "seed": 0}])
    return cfg, run_benchmark(cfg)


def test_serial_grid(grid):
    cfg, data = grid
    validate_results(data)
    assert json.loads((Path(cfg.out) / "results.json").read_text()) == data
    records = data["records"]
    assert [(r["agent"], r["target_sparsity"], r["seed"]) for r in records] == [
        ("uniform", 0.3, 0), ("uniform", 0.5, 0), ("owl", 0.3, 0), ("owl", 0.5, 0)]
    assert all(r["status"] == "ok" and r["error"] is None for r in records)
    for r in records:
        assert r["achieved_sparsity"] == pytest.approx(r["target_sparsity"], abs=1e-3)
        assert len(r["allocation"]) == len(data["units"]) == 3
        assert r["ppl"] > 1 and 0 <= r["fact_acc"] <= 1 and r["llm_model"] is None
    assert records[1]["allocation"] == [0.5] * 3
    assert records[3]["allocation"] != records[1]["allocation"]
    # held-out data: text after the env's reward region, facts after the env's reward slice
    env = data["env_data"]["reward_slices"]
    assert data["data"]["text"]["evaluation"]["region"][0] == env["text_region"][1]
    assert data["data"]["text"]["evaluation"]["tokens"] == 512
    assert data["data"]["facts"] == {"source": "offline", "n": 40, "offset": 20} and env["facts"] == [0, 20]
    assert {"platform", "cpu_count", "torch", "transformers", "device"} <= set(data["machine"])
    assert data["operator"] == {"method": "wanda", "pattern": None, "granularity": "block"}
    out = Path(cfg.out)
    report = (out / "report.md").read_text()
    assert "## Target sparsity 0.5" in report and "| owl | 1/0 |" in report
    assert report.count("| agent | points | on its front | hypervolume |") == 2  # a trade-off front per target
    assert (out / "front_t0.5.png").stat().st_size > 1000 and "![front_t0.5.png](front_t0.5.png)" in report
    for png in ("allocation_t0.3.png", "allocation_t0.5.png", "ppl_vs_sparsity.png", "facts_vs_sparsity.png"):
        assert (out / png).stat().st_size > 1000 and f"![{png}]({png})" in report


def test_cell_matches_a_direct_prune(grid):
    from prune_env.context import load_template

    cfg, data = grid
    held = heldout_data(cfg, load_template("tiny-llama", "cpu", "float32")[1])
    ctx = PruningContext("tiny-llama", data=held.data)
    ctx.prune(data["records"][3]["allocation"])
    metrics = ctx.evaluate().as_dict()
    ctx.restore()
    assert metrics["ppl"] == data["records"][3]["ppl"] and metrics["fact_acc"] == data["records"][3]["fact_acc"]


def test_export_reloads_and_reproduces_ppl(grid):
    cfg, data = grid
    (entry,) = data["exports"]
    assert entry["ok"] and entry["cell"] == "owl-t0.5-s0"
    directory = Path(entry["dir"])
    assert (directory / "model" / "config.json").exists() and (directory / "masks.safetensors").exists()
    again = check_export(directory)
    assert again["ok"] and again["ppl_reloaded"] == pytest.approx(data["records"][3]["ppl"], rel=1e-6)


def test_schema_validation(grid):
    _, data = grid
    validate_results(data)
    broken = copy.deepcopy(data)
    broken["records"][2]["ppl"] = "abc"
    with pytest.raises(ResultsError, match=r"records\[2\] \(agent='owl', target=0.3, seed=0\): ok record needs a "
                                           r"finite number 'ppl', got 'abc'"):
        validate_results(broken)
    cases = [
        (lambda d: d["records"][0].pop("status"), "missing field 'status'"),
        (lambda d: d["records"][0].update(status="done"), "'status' must be 'ok' or 'failed'"),
        (lambda d: d["records"][0].update(error="boom"), "ok record must have error null"),
        (lambda d: d["records"][0].update(status="failed", error=None), "failed record needs a non-empty 'error'"),
        (lambda d: d["records"][0].update(allocation=[0.5]), "has 1 ratios but there are 3 units"),
        (lambda d: d["records"][0].update(target_sparsity=1.5), "'target_sparsity' must be a number in \\(0, 1\\)"),
        (lambda d: d["records"].append(copy.deepcopy(d["records"][0])), "duplicate of records\\[0\\]"),
        (lambda d: d.pop("machine"), "missing top-level field 'machine'"),
        (lambda d: d["records"][1].update(iterations=-1), "'iterations' must be a non-negative integer"),
    ]
    for mutate, message in cases:
        bad = copy.deepcopy(data)
        mutate(bad)
        with pytest.raises(ResultsError, match=message):
            validate_results(bad)


def test_resume_skips_finished_cells(workspace, monkeypatch):
    cfg = make_config(workspace, "resume", agents=[{"name": "uniform"}, {"name": "random"}], seeds=[0, 1])
    # 2 targets x (uniform: 1 computed + 1 reused, random: 2 computed) = 6 computed cells of 8
    original = Runner.run_cell
    calls = []

    def interrupted(self, agent, target, seed):
        calls.append((agent, target, seed))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, agent, target, seed)

    monkeypatch.setattr(Runner, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg)
    path = Path(cfg.out) / "results.json"
    first = json.loads(path.read_text())
    validate_results(first)
    done = {(r["agent"], r["target_sparsity"], r["seed"]) for r in first["records"]}
    assert done == {("uniform", 0.3, 0), ("uniform", 0.3, 1), ("uniform", 0.5, 0), ("uniform", 0.5, 1),
                    ("random", 0.3, 0)}
    assert [r["reused_from_seed"] for r in first["records"] if r["agent"] == "uniform"] == [None, 0, None, 0]

    monkeypatch.setattr(Runner, "run_cell", original)
    with pytest.raises(FileExistsError, match="--resume"):
        run_benchmark(cfg)
    prunes = []
    real_prune = PruningContext.prune
    monkeypatch.setattr(PruningContext, "prune", lambda self, *a, **k: prunes.append(1) or real_prune(self, *a, **k))
    final = run_benchmark(cfg, resume=True)
    assert len(prunes) == 3  # random t=0.3 s=1, t=0.5 s=0, t=0.5 s=1: nothing finished is recomputed
    assert len(final["records"]) == 8 and all(r["status"] == "ok" for r in final["records"])
    before = {(r["agent"], r["target_sparsity"], r["seed"]): r for r in first["records"]}
    for r in final["records"]:
        key = (r["agent"], r["target_sparsity"], r["seed"])
        if key in before:
            assert r == before[key]  # same seconds too: not recomputed

    prunes.clear()  # a changed agent config is recomputed on resume, the unchanged agents are kept
    retuned = dataclasses.replace(cfg, agents=[{"name": "uniform"}, {"name": "random", "high": 0.9}])
    again = run_benchmark(retuned, resume=True)
    assert len(prunes) == 4 and all(r["agent_config"].get("high") == 0.9 for r in again["records"]
                                    if r["agent"] == "random")

    changed = dataclasses.replace(cfg, heldout=dataclasses.replace(cfg.heldout, eval_tokens=256))
    with pytest.raises(ResultsError, match="different data"):
        run_benchmark(changed, resume=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_cell_is_recorded_and_others_finish(workspace):
    llm = {"name": "llm", "mode": "oneshot",
           "backend": {"type": "openai", "base_url": f"http://127.0.0.1:{_closed_port()}/v1", "model": "m",
                       "max_retries": 0, "timeout": 2},
           "agent": {"on_backend_error": "raise"}}  # the default falls back to zscore-greedy and never fails
    broken = workspace["root"] / "broken.zip"  # exists (a missing path is refused up front) but is no policy
    broken.write_bytes(b"not a zip")
    cfg = make_config(workspace, "failing", targets=[0.5], seeds=[0, 1],
                      agents=[llm, {"name": "rl", "path": str(broken)}, {"name": "zscore-greedy"}])
    data = run_benchmark(cfg)
    by = {(r["agent"], r["seed"]): r for r in data["records"]}
    for key in (("llm", 0), ("llm", 1), ("rl:broken", 0)):
        assert by[key]["status"] == "failed" and by[key]["error"] and by[key]["ppl"] is None
    assert by[("llm", 0)]["error"].startswith("LLMBackendError") and by[("llm", 0)]["llm_model"] == "m"
    assert by[("rl:broken", 0)]["traceback"]
    assert by[("zscore-greedy", 0)]["status"] == by[("zscore-greedy", 1)]["status"] == "ok"
    assert "## Failed cells" in (Path(cfg.out) / "report.md").read_text()


def test_cli_errors_and_report_only(grid, capsys):
    cfg, _ = grid
    assert benchmark.main(["--config", str(DEFAULT_CONFIG), "modle=tiny-llama"]) == 2
    assert "unknown config key 'modle'" in capsys.readouterr().err
    assert benchmark.main(["--config", str(DEFAULT_CONFIG), "agents=[{name: owll}]"]) == 2
    assert "unknown agent 'owll'" in capsys.readouterr().err
    assert benchmark.main(["--config", str(DEFAULT_CONFIG), "--out", cfg.out, "--report-only",
                           "report.allocation_target=0.31"]) == 0  # one plot, at the nearest target
    assert "allocation_t0.3.png" in (Path(cfg.out) / "report.md").read_text()
    assert "allocation_t0.5.png" not in (Path(cfg.out) / "report.md").read_text()
    loaded = load_benchmark_config(DEFAULT_CONFIG, ["targets=[0.5]"], eval_text="x.txt", export=["rl:ppo:0.5:1"])
    assert loaded.data.text == "x.txt" and [dataclasses.asdict(e) for e in loaded.export] == [
        {"agent": "rl:ppo", "target": 0.5, "seed": 1}]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'ray[default]')")
def test_ray_backend_matches_serial(grid, workspace):
    cfg, serial = grid
    ray_cfg = make_config(workspace, "ray", backend="ray", ray={"num_workers": 1, "num_cpus": 2})
    data = run_benchmark(ray_cfg)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "timings")}  # noqa: E731
    assert [strip(r) for r in data["records"]] == [strip(r) for r in serial["records"]]
    assert data["machine"]["backend"] == "ray" and data["dense"] == serial["dense"]


class _ContextSpy(Agent):
    """Uniform, remembering the context it was handed."""

    name = "spy"

    def __init__(self, plays_env: bool) -> None:
        super().__init__()
        self.plays_env = plays_env
        self.seen: list = []

    def allocate(self, ctx, target: float, seed: int) -> list[float]:
        self.seen.append(ctx)
        return [target] * len(ctx.units)


def test_agents_that_play_envs_never_see_the_heldout_data(workspace):
    """Agents that play envs (iterative LLM rollbacks, RL, search) decide on the env's reward slices; allocation
    rules get the context the benchmark prunes (its calibration statistics and profile)."""
    cfg = make_config(workspace, "spy", targets=[0.5])
    player, rule = _ContextSpy(plays_env=True), _ContextSpy(plays_env=False)
    runner = Runner(cfg, agents={"player": player, "rule": rule})
    assert runner.run_cell("player", 0.5, 0)["status"] == runner.run_cell("rule", 0.5, 0)["status"] == "ok"
    (lent,), (pruned,) = player.seen, rule.seen
    assert pruned is runner.ctx and lent is not runner.ctx
    env_ctx = PruningContext("tiny-llama", data=cfg.data)  # what the env itself is built on
    assert torch.equal(lent.slices.evaluation, env_ctx.slices.evaluation)
    assert [f.prompt for f in lent.facts] == [f.prompt for f in env_ctx.facts]
    heldout_prompts = {f.prompt for f in runner.ctx.facts}
    assert heldout_prompts and not heldout_prompts & {f.prompt for f in lent.facts}
    assert not torch.equal(runner.ctx.slices.evaluation[: len(lent.slices.evaluation)], lent.slices.evaluation)


def test_report_only_backfills_the_balanced_metric_exactly_as_measured(grid, tmp_path):
    """A results.json from before the balanced metric (no fact names, no balanced fields) gains them from its
    own per-fact flags and config: the very values the run measured, and the report's balanced interval."""
    from prune_bench.backfill import needs_backfill

    cfg, data = grid
    old = json.loads(json.dumps(data))
    old["dense_per_fact"] = {"greedy_exact": data["dense_per_fact"]["greedy_exact"]}
    old.pop("knowledge_baseline", None)
    for record in old["records"]:
        for key in ("fact_retention_balanced", "fact_acc_balanced", "retention_by_relation"):
            record.pop(key, None)
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(old))
    assert needs_backfill(old) and not needs_backfill(data)
    assert benchmark.main(["--config", str(DEFAULT_CONFIG), "--out", str(out), "--report-only"]) == 0
    new = json.loads((out / "results.json").read_text())
    assert new["dense_per_fact"] == data["dense_per_fact"]
    assert new["knowledge_baseline"] == data["knowledge_baseline"]
    for measured, backfilled in zip(data["records"], new["records"]):
        for key in ("fact_retention_balanced", "fact_acc_balanced", "retention_by_relation"):
            assert backfilled[key] == pytest.approx(measured[key]), key
    report = (out / "report.md").read_text()
    assert report.count("balanced retention diff") == len(cfg.targets) and "| owl |" in report
    # a file whose flags do not match its config's facts is refused, not mislabelled
    old["dense_per_fact"]["greedy_exact"] = old["dense_per_fact"]["greedy_exact"][:-1]
    for record in old["records"]:
        record["per_fact"] = None
    (out / "results.json").write_text(json.dumps(old))
    assert benchmark.main(["--config", str(DEFAULT_CONFIG), "--out", str(out), "--report-only"]) == 2
