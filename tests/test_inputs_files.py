"""Damaged input files: a user's file is an error that names it; a damaged cache file is discarded
(with a warning naming it) and rebuilt, so it never blocks later runs. Fetching the handbook never
changes the machine's package state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from prune_env.data import corpus
from prune_env.data.corpus import SourceUnavailableError, load_text
from prune_env.data.facts import load_facts
from prune_env.files import read_cache, read_cache_json

GARBAGE = b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfa binary garbage \xc3\x28\n"


def test_binary_facts_file_names_file_and_line(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    good = json.dumps({"prompt": "The capital of France is", "answer": "Paris"})
    facts.write_bytes(good.encode() + b"\n" + GARBAGE)
    with pytest.raises(ValueError) as error:
        load_facts(str(facts))
    message = str(error.value)
    assert f"{facts}:2:" in message and "UTF-8" in message


def test_binary_text_file_names_file(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_bytes(GARBAGE)
    with pytest.raises(ValueError, match="corpus.txt.*not valid UTF-8"):
        load_text(str(text))


HANDBOOK_PAGE = "<html><body><div>" + "The package manager installs software. " * 10 + "</div></body></html>"


def test_corrupt_handbook_cache_is_rebuilt_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / "prune-gym" / "text" / "debian-handbook.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(GARBAGE)
    monkeypatch.setattr(corpus, "_handbook_pages", lambda: ({"a.html": HANDBOOK_PAGE}, "test pages"))
    with pytest.warns(RuntimeWarning, match=str(cached)):
        text = load_text("debian-handbook", cache_dir=tmp_path)
    assert text.startswith("The package manager installs software.")
    assert cached.read_text(encoding="utf-8") == text  # rebuilt: the next run reads it without a warning
    monkeypatch.setattr(corpus, "_handbook_pages", lambda: pytest.fail("the cache must serve the second call"))
    assert load_text("debian-handbook", cache_dir=tmp_path) == text


def test_read_cache_json_discards_garbage_and_reads_intact_files(tmp_path: Path) -> None:
    path = tmp_path / "dense-abc.json"
    path.write_bytes(GARBAGE)
    with pytest.warns(RuntimeWarning, match="dense-abc.json.*rebuilt"):
        assert read_cache_json(path) is None
    assert not path.exists()
    path.write_text(json.dumps({"ppl": 12.5}))
    assert read_cache_json(path) == {"ppl": 12.5}
    assert read_cache_json(tmp_path / "absent.json") is None


def test_read_cache_discards_truncated_torch_file_and_wrong_fields(tmp_path: Path) -> None:
    path = tmp_path / "profile.pt"
    torch.save({"act_norm": {"a": torch.ones(3)}, "grad_mean": {"a": 1.0}}, path)
    intact = path.read_bytes()

    def load(p: Path) -> dict:
        data = torch.load(p, weights_only=True)
        return {"act_norm": data["act_norm"], "grad_mean": data["grad_mean"]}

    assert torch.equal(read_cache(path, load)["act_norm"]["a"], torch.ones(3))
    path.write_bytes(intact[: len(intact) // 2])
    with pytest.warns(RuntimeWarning, match="profile.pt"):
        assert read_cache(path, load) is None
    torch.save({"other": 1}, path)  # parses, but is not what this cache holds
    with pytest.warns(RuntimeWarning, match="KeyError"):
        assert read_cache(path, load) is None


def test_failed_handbook_download_never_runs_apt_get_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        commands.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package debian-handbook")

    monkeypatch.setattr(corpus.subprocess, "run", fake_run)
    with pytest.raises(SourceUnavailableError) as error:
        corpus._apt_download(tmp_path)
    assert commands and all("update" not in cmd for cmd in commands)
    message = str(error.value)
    assert "Unable to locate package" in message and "sudo apt-get update" in message and "\n" not in message


def test_overlong_facts_line_is_refused_while_reading(tmp_path: Path) -> None:
    """A line is read at most 64 KiB at a time: a 20 MB line costs kilobytes, not its size (once 21.9 GB)."""
    import tracemalloc

    from prune_env.data.facts import MAX_LINE_BYTES

    facts = tmp_path / "facts.jsonl"
    good = json.dumps({"prompt": "The capital of France is", "answer": "Paris"})
    with facts.open("w", encoding="utf-8") as f:
        f.write(good + "\n\n" + '{"prompt": "' + "x" * 20_000_000 + '"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as error:
            load_facts(str(facts))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(f"{facts}:3: line longer than {MAX_LINE_BYTES:,} bytes")
    assert peak < 1_000_000, peak
    # a line of exactly the limit still reads (with "\r\n" endings too)
    prompt = "The capital of France is" + " " * (MAX_LINE_BYTES - len(good))
    exact = json.dumps({"prompt": prompt, "answer": "Paris"})
    assert len(exact.encode()) == MAX_LINE_BYTES
    facts.write_bytes((good + "\r\n" + exact + "\r\n").encode())
    assert [f.answer for f in load_facts(str(facts))] == ["Paris", "Paris"]
    facts.write_bytes((good + "\r\n" + exact + "\r\n" + exact + " \r\n").encode())  # one byte too many
    with pytest.raises(ValueError, match=f"facts.jsonl:3: line longer than {MAX_LINE_BYTES:,} bytes"):
        load_facts(str(facts))  # counted right after a full-length line
