"""benchmark.py refuses bad input before any work and never shares an output folder with another run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
from prune_bench.runner import Runner
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
