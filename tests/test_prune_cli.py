"""The one-shot CLI (python -m prune_env.cli) on tiny-llama: outputs checked against the saved model,
and bad input that fails with a clear message and leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prune_env import cli
from prune_env.data.windows import split_corpus, tokenize_corpus
from prune_env.models import linear_layers, weight_matrix
from prune_env.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny-llama", "--eval-tokens", "1024", "--calib-samples", "4", "--calib-seq-len", "32",
         "--device", "cpu"]


def cli_args(text_file, facts_file, out, *extra) -> list[str]:
    return [*SMALL, "--eval-text", str(text_file), "--facts", str(facts_file), "--out", str(out), *extra]


def hand_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logprob = torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].double(), dim=-1)
            nll -= float(logprob.gather(1, row[1:, None]).sum())
            count += row.numel() - 1
    return math.exp(nll / count)


def test_cli_writes_metrics_masks_and_model(tmp_path, text_file, facts_file, capsys):
    out = tmp_path / "runs" / "wanda50"
    assert cli.main(cli_args(text_file, facts_file, out, "--sparsity", "0.5")) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "metrics.json", "model"]
    assert [p.name for p in out.parent.iterdir()] == ["wanda50"]  # no staging folder left beside it
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("dense", "pruned"):
        assert set(metrics[part]) == {"ppl", "fact_acc", "fact_nll", "fact_retention", "fact_retention_balanced", "fact_acc_balanced", "fact_answer_ppl_balanced", "retention_by_relation"}
    assert metrics["method"] == "wanda" and metrics["target_sparsity"] == 0.5
    assert metrics["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)

    masks = load_file(str(out / "masks.safetensors"))
    dense, _ = tiny_model("llama")
    refs = linear_layers(dense)
    assert set(masks) == {ref.name for ref in refs}
    zeros = {name: int((keep == 0).sum()) for name, keep in masks.items()}
    numel = {ref.name: ref.numel for ref in refs}
    assert metrics["achieved_sparsity"] == pytest.approx(sum(zeros.values()) / sum(numel.values()), abs=1e-12)
    for name, share in metrics["per_layer_sparsity"].items():
        assert share == pytest.approx(zeros[name] / numel[name], abs=1e-12)
        assert zeros[name] == round(0.5 * numel[name])

    # the saved model is the dense one times the masks (Wanda keeps the surviving weights as they are)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    saved_refs = {ref.name: ref for ref in linear_layers(saved)}
    for ref in refs:
        keep = masks[ref.name].bool()
        assert torch.equal(weight_matrix(saved_refs[ref.name].module), weight_matrix(ref.module) * keep)

    # the reported perplexities are those of the dense and the saved model on the evaluation windows
    ids = tokenize_corpus(text_file.read_text(encoding="utf-8"), tiny_tokenizer())
    windows = split_corpus(ids, calib_samples=4, calib_seq_len=32, eval_tokens=1024, eval_seq_len=512).evaluation
    assert windows.shape == (2, 512)
    assert metrics["dense"]["ppl"] == pytest.approx(hand_perplexity(dense, windows), rel=1e-5)
    assert metrics["pruned"]["ppl"] == pytest.approx(hand_perplexity(saved, windows), rel=1e-5)
    assert metrics["pruned"]["ppl"] != metrics["dense"]["ppl"]


def test_cli_allocation_and_no_model(tmp_path, text_file, facts_file):
    allocation = tmp_path / "alloc.json"
    allocation.write_text(json.dumps({"block.0": 0.2, "model.layers.2.mlp.up_proj": 0.7}))
    out = tmp_path / "mag"
    code = cli.main(cli_args(text_file, facts_file, out, "--method", "magnitude", "--allocation",
                               str(allocation), "--no-save-model"))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_sparsity"] is None
    for name, share in metrics["per_layer_sparsity"].items():
        expected = 0.2 if ".layers.0." in name else 0.7 if name == "model.layers.2.mlp.up_proj" else 0.0
        assert share == pytest.approx(expected, abs=1e-3), name


# ----------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD = {
    "unknown model": (lambda d: ["--model", "no-such-model"], "unknown model 'no-such-model'"),
    "sparsity 1.0": (lambda d: ["--sparsity", "1.0"], r"--sparsity=1.0 is outside the allowed range \[0, 1\)"),
    "sparsity nan": (lambda d: ["--sparsity", "nan"], r"--sparsity=nan is not a number"),
    "bad pattern": (lambda d: ["--pattern", "4:2"], "0 < N < M"),
    "allocation length": (lambda d: ["--allocation", _write(d / "a.json", "[0.5, 0.5, 0.5, 0.5, 0.5]")],
                          r"has 5 ratios: give one per decoder block \(3\) or one per linear layer \(21\)"),
    "unknown layer": (lambda d: ["--allocation", _write(d / "a.json", '{"model.layers.9.mlp.up_proj": 0.5}')],
                      r"unknown layer\(s\) \['model.layers.9.mlp.up_proj'\]"),
    "allocation NaN": (lambda d: ["--allocation", _write(d / "a.json", "[NaN, 0.5, 0.5]")],
                       r"entry 0 sparsity=nan is not a number"),
    "allocation 1.0": (lambda d: ["--allocation", _write(d / "a.json", '{"block.1": 1.0}')],
                       r"\['block.1'\].*outside the allowed range \[0, 1\)"),
    "missing allocation": (lambda d: ["--allocation", str(d / "none.json")], "--allocation file .* does not exist"),
    "missing text": (lambda d: ["--eval-text", str(d / "none.txt")], "--eval-text file .*none.txt.* does not exist"),
    "missing facts": (lambda d: ["--facts", str(d / "none.jsonl")], "--facts file .*none.jsonl.* does not exist"),
    "malformed jsonl": (lambda d: ["--facts", _write(d / "bad.jsonl", '{"prompt": "The capital of France is", '
                                                                    '"answer": "Paris"}\n{"prompt": oops}\n')],
                        r"bad.jsonl:2: bad JSON"),
    "binary allocation": (lambda d: ["--allocation", _write_bytes(d / "bin.json", b"\x89PNG\x00\xff")],
                          r"--allocation file .*bin.json.* is not UTF-8 JSON"),
    "binary text": (lambda d: ["--eval-text", _write_bytes(d / "bin.txt", b"\x89PNG\x00\xff")],
                    r"text file .*bin.txt.* is not valid UTF-8"),
    "binary jsonl": (lambda d: ["--facts", _write_bytes(d / "bin.jsonl", b"\x89PNG\x00\xff\xfe")],
                     r"bin.jsonl:1: not UTF-8 text"),
    "pattern and sparsity": (lambda d: ["--pattern", "2:4", "--sparsity", "0.6"],
                             r"--pattern 2:4 fixes the sparsity at 2/4 .* drop --sparsity"),
    "pattern and allocation": (lambda d: ["--pattern", "2:4", "--allocation", _write(d / "a.json", "[0.5, 0.5, 0.5]")],
                               r"--pattern 2:4 .* drop --allocation"),
    "eval tokens below one window": (lambda d: ["--eval-tokens", "100"],
                                     r"--eval-tokens=100 is outside the allowed range \[512, inf\)"),
    "negative n-facts": (lambda d: ["--n-facts", "-1"], r"--n-facts=-1 is outside the allowed range \[0, inf\)"),
    "zero calibration": (lambda d: ["--calib-samples", "0"], r"--calib-samples=0 is outside"),
    "device tpu": (lambda d: ["--device", "tpu"], r"device='tpu' is not a device torch knows"),
    "bert model": (lambda d: ["--model", _bert_folder(d / "bert")], r"model type 'bert'.*Llama, Qwen2/3"),
    "auto_map model": (lambda d: ["--model", _auto_map_folder(d / "custom")],
                       r"'auto_map' entry\), which this project never runs"),
    "overlong facts line": (lambda d: ["--facts", _write(d / "long.jsonl", '{"prompt": "' + "x" * 100_000 + '"}\n')],
                            r"long.jsonl:1: line longer than 65,536 bytes"),
}


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _bert_folder(path: Path) -> str:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(path)
    return str(path)


def _auto_map_folder(path: Path) -> str:
    """A Llama folder whose config.json points transformers at the folder's own (here harmless) Python."""
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _long_fact(path: Path) -> str:
    """A facts file whose second fact has a 20 KB prompt (tiny-llama's context is 256 tokens)."""
    rows = [{"prompt": "The capital of France is", "answer": "Paris"},
            {"prompt": "The capital of Spain is" + " very" * 4000, "answer": "Madrid"}]
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


# Refused from the config, the tokenizer and the text, after the context started but before any weight loads.
BAD_DATA = {
    "text too short": (lambda d: ["--eval-text", _write(d / "short.txt", "A short text. " * 20)],
                       r"corpus too small: .*short.txt needs at least \d+ tokens .* but has \d+"),
    "calibration beyond the text": (lambda d: ["--calib-samples", "1000000"],
                                    r"calib_samples=1000000 x calib_seq_len=32 .* use calib_samples <= \d+"),
    "fact longer than the context": (lambda d: ["--facts", _long_fact(d / "long.jsonl")],
                                     r"fact 2 of .*long.jsonl \(prompt 'The capital of Spain is very.* more than the "
                                     r"context of model 'tiny-llama' \(256 tokens\)"),
}


@pytest.mark.parametrize("case", [*BAD, *BAD_DATA])
def test_cli_bad_input(tmp_path, text_file, facts_file, capsys, monkeypatch, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra, message = BAD[case] if case in BAD else BAD_DATA[case]

    def no_model(*args, **kwargs):
        raise AssertionError(f"{case}: the model was loaded before the input was refused")

    if case in BAD:
        monkeypatch.setattr(cli, "PruningContext", no_model)
    else:
        from prune_env import context

        monkeypatch.setattr(context, "private_model", no_model)
    out = tmp_path / "runs" / "result"
    args = cli_args(text_file, facts_file, out) + extra(inputs)  # later flags override the defaults
    capsys.readouterr()  # drop what building the inputs printed
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert re.search(message, err), err
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_refuses_non_empty_out(tmp_path, text_file, facts_file, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(cli_args(text_file, facts_file, out)) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_failure_while_writing_leaves_nothing(tmp_path, text_file, facts_file, capsys, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise ValueError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    out = tmp_path / "runs" / "result"
    assert cli.main(cli_args(text_file, facts_file, out)) == 2
    assert "disk full" in capsys.readouterr().err
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


def test_cli_as_a_module_subprocess(tmp_path, text_file, facts_file):
    out = tmp_path / "sub"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prune_env.cli",
                           *cli_args(text_file, facts_file, out, "--sparsity", "0.3", "--no-save-model")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}/metrics.json" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["achieved_sparsity"] == pytest.approx(0.3, abs=1e-3)


MEMORY_PROBES = {  # each once asked for gigabytes (6.1 GB, 21.9 GB, 9 GB): now a one-line error
    "20 KB fact prompt": lambda d: ["--facts", _long_fact(d / "long.jsonl")],
    "10 MB facts line": lambda d: ["--facts", _write(d / "big.jsonl", '{"prompt": "' + "x" * 10_000_000 + '"}\n')],
    "a million calibration windows": lambda d: ["--calib-samples", "1000000"],
}


@pytest.mark.parametrize("case", list(MEMORY_PROBES))
def test_cli_memory_probes_end_in_a_one_line_error_with_a_small_peak(tmp_path, text_file, facts_file, case):
    """Peak RSS of the CLI process (a generous bound: the imports alone take ~400 MB)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    command = [sys.executable, "-m", "prune_env.cli", *cli_args(text_file, facts_file, tmp_path / "out"),
               *MEMORY_PROBES[case](inputs)]
    probe = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(f'{done.returncode} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); "
             "sys.stdout.write(done.stderr)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    first, err = done.stdout.split("\n", 1)
    code, peak_kib = map(int, first.split())
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
    assert peak_kib < 2 * 1024 * 1024, f"{case}: peak RSS {peak_kib / 1024:.0f} MiB"


# ----------------------------------------------------------------------------- output folder and defaults


def test_cli_defaults_are_the_data_config_defaults():
    from prune_env.context import DataConfig

    args = cli.build_parser().parse_args(["--out", "x"])
    data = DataConfig()
    assert (args.eval_text, args.facts, args.eval_tokens, args.n_facts, args.calib_samples, args.calib_seq_len,
            args.seed) == (data.text, data.facts, data.eval_tokens, data.n_facts, data.calib_samples,
                           data.calib_seq_len, data.seed)


def test_cli_unwritable_out_fails_before_loading_the_model(tmp_path, text_file, facts_file, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli, "PruningContext", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "result"  # a folder can never be made under a file (the root user is refused too)
    assert cli.main(cli_args(text_file, facts_file, out)) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "not writable" in err
    assert blocker.read_text() == "x"


def test_cli_refuses_an_out_another_run_holds(tmp_path, text_file, facts_file, capsys, monkeypatch):
    from prune_env.files import output_lock

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although --out is in use")

    monkeypatch.setattr(cli, "PruningContext", no_model)
    out = tmp_path / "shared"
    with output_lock(out, "--out"):  # another run holds it (flock is per open file, so this process counts)
        (out / ".staging-other").mkdir()  # and is writing its results
        assert cli.main(cli_args(text_file, facts_file, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "in use by pid" in err
        assert sorted(p.name for p in out.iterdir()) == [".prune-gym.lock", ".staging-other"]


def test_cli_second_run_keeps_the_first_runs_results(tmp_path, text_file, facts_file, capsys):
    out = tmp_path / "once"
    assert cli.main(cli_args(text_file, facts_file, out, "--method", "magnitude", "--no-save-model")) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["masks.safetensors", "metrics.json"]  # no lock or staging left behind
    assert cli.main(cli_args(text_file, facts_file, out, "--method", "wanda", "--no-save-model")) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_cli_pattern_records_its_own_target(tmp_path, text_file, facts_file):
    out = tmp_path / "nm"
    assert cli.main(cli_args(text_file, facts_file, out, "--method", "magnitude", "--pattern", "1:4",
                               "--no-save-model")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_sparsity"] == 0.25 and metrics["pattern"] == "1:4"
    assert metrics["achieved_sparsity"] == pytest.approx(0.25, abs=1e-12)


def test_cli_clears_a_killed_runs_leftovers(tmp_path, text_file, facts_file):
    out = tmp_path / "after-crash"
    out.mkdir()
    (out / ".prune-gym.lock").write_text("pid 1\n")  # nobody holds it: the run was killed
    (out / ".staging-dead").mkdir()
    (out / ".staging-dead" / "masks.safetensors").write_bytes(b"partial")
    assert cli.main(cli_args(text_file, facts_file, out, "--method", "magnitude", "--no-save-model")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "metrics.json"]
