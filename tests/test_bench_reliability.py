"""benchmark.py refuses bad input before any work and never shares an output folder with another run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
from prune_bench.runner import Runner
from prune_bench.store import ResultsError, validate_results
from prune_env.files import LOCK_NAME, output_lock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_args(text_file):
    """CLI arguments of a one-cell tiny benchmark (the repository config with tiny overrides)."""
    return ["model=tiny-llama", "device=cpu", "threads=1", "targets=[0.5]", "seeds=[0]", "agents=[{name: uniform}]",
            f"data.text={text_file}", "data.calib_samples=4", "data.calib_seq_len=32", "data.eval_tokens=256",
            "data.eval_seq_len=64", "data.n_facts=20", "data.grad_samples=2", "heldout.eval_tokens=512",
            "heldout.eval_seq_len=64", "heldout.n_facts=40"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model is loaded: these errors must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started work before refusing its input")

    monkeypatch.setattr(Runner, "__init__", refuse)


@pytest.mark.parametrize("override, named", [
    ("data.calib_samples=four", "'four'"),
    ("device=tpu", "'tpu'"),
    ("agents=[{name: rl, path: no/such/policy.zip}]", "'no/such/policy.zip'"),
    ("targets=[0.5, 1.5]", "1.5"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tiny_args, tmp_path, capsys, no_work, override, named):
    out = tmp_path / "out"
    assert benchmark.main([*tiny_args, override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and named in err
    assert not out.exists()


def test_unwritable_out_is_refused_before_work(tiny_args, tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"  # cannot be created, even by root
    assert benchmark.main([*tiny_args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not writable" in err and str(out) in err
    assert blocker.read_text() == "not a folder"


def test_second_writer_is_refused_and_touches_nothing(tiny_args, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.json"
    results.write_text('{"written by": "the first run"}')
    with output_lock(out, "benchmark output folder"):
        for extra in ([], ["--resume"], ["--report-only"]):
            assert benchmark.main([*tiny_args, "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "is in use by pid" in err
    assert results.read_text() == '{"written by": "the first run"}'
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, "results.json"])


def test_second_process_is_refused_while_the_first_runs(tiny_args, tmp_path):
    out = tmp_path / "out"
    with output_lock(out, "benchmark output folder"):  # the first run, as far as the second can tell
        second = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *tiny_args, "--out", str(out)],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().count("\n") == 0 and "is in use by pid" in second.stderr
    assert not (out / "results.json").exists()


def test_unlocked_folder_runs_and_a_failed_start_leaves_no_folder(tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert benchmark.main([*tiny_args, "--out", str(out)]) == 0
    assert (out / "results.json").exists() and (out / "report.md").exists()
    missing_text = tmp_path / "fresh"
    assert benchmark.main([*tiny_args, "data.text=" + str(tmp_path / "no-such.txt"), "--out", str(missing_text)]) == 2
    assert "no-such.txt" in capsys.readouterr().err and not missing_text.exists()


@pytest.mark.parametrize("backend, named", [
    ("{type: openai, base_url: 'htp://127.0.0.1:8000/v1', model: m}", "base_url='htp://127.0.0.1:8000/v1' has scheme"),
    ("{type: openai, base_url: 'http://127.0.0.1:8000/v1'}", "the openai llm backend needs a model id"),
])
def test_bad_llm_backend_is_refused_when_the_config_is_loaded(tiny_args, tmp_path, capsys, no_work, monkeypatch,
                                                              backend, named):
    for name in ("OPENAI_MODEL", "PRUNE_GYM_LLM_MODEL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert benchmark.main([*tiny_args, f"agents=[{{name: llm, mode: oneshot, backend: {backend}}}]",
                           "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "agents[0] (llm): " in err and named in err and not out.exists()


def test_no_run_file_holds_the_key_and_an_all_fallback_cell_is_flagged(tiny_args, tmp_path, capsys, monkeypatch):
    """The served model redirects to another port: that port never sees the key, every move falls back, and
    the key given in the config (api_key, and an env var for Ray workers) is in no file of the run."""
    from fake_openai_server import ScriptedOpenAIServer, redirect

    secret = "sk-bench-secret-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-env-key-0123456789")
    with ScriptedOpenAIServer(["{}"]) as other, ScriptedOpenAIServer() as srv:
        srv.default = redirect(other.url + "/chat/completions", 307)
        llm = (f"{{name: llm, mode: oneshot, backend: {{type: openai, base_url: '{srv.url}', model: m, "
               f"api_key: {secret}, max_retries: 0}}}}")
        out = tmp_path / "out"
        args = [*tiny_args, f"agents=[{{name: uniform}}, {llm}]", "seeds=[0, 1]",
                f"ray.runtime_env={{env_vars: {{OPENAI_API_KEY: {secret}}}}}", "--out", str(out)]
        assert benchmark.main(args) == 0
        assert other.requests == [] and len(srv.requests) == 2  # one refused request per cell
        assert all(r["headers"]["Authorization"] == f"Bearer {secret}" for r in srv.requests)
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {"results.json", "report.md", "llm-t0.5-s0.jsonl"} <= {p.name for p in files}
        assert [p.name for p in files if secret.encode() in p.read_bytes()] == []
        data = json.loads((out / "results.json").read_text())
        assert data["config"]["agents"][1]["backend"]["api_key"] == "***"
        assert data["config"]["ray"]["runtime_env"]["env_vars"]["OPENAI_API_KEY"] == "***"
        llm_records = [r for r in data["records"] if r["agent"] == "llm"]
        assert [r["llm"]["all_fallback"] for r in llm_records] == [True, True]
        assert all(r["llm"]["moves"] == r["llm"]["fallback_moves"] == 1 for r in llm_records)
        assert all(r["agent_config"]["backend"]["api_key"] == "***" for r in llm_records)
        report = (out / "report.md").read_text()
        assert "| llm † | 2/0 |" in report and "† llm: every move of 2 of the 2 ok seed(s)" in report
        assert "| llm | 0.5 | 0 | m | 1 | 0 | 1/1 (all) |" in report
        capsys.readouterr()
        assert benchmark.main([*args, "--resume"]) == 0  # the redacted configs still match: nothing is redone
        assert len(srv.requests) == 2 and "0 to compute" in capsys.readouterr().err
    validate_results(data)
    bad = copy.deepcopy(data)
    bad["records"][-1]["llm"]["all_fallback"] = False
    with pytest.raises(ResultsError, match="'llm.all_fallback' is False but 1 of 1 moves fell back"):
        validate_results(bad)
