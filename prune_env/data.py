"""Text sources for perplexity evaluation and pruning calibration.

Why this module exists: pruning needs two disjoint kinds of text, random calibration
windows (Wanda / SparseGPT draw 128 x 2048-token windows from C4 train) and contiguous
evaluation windows (the WikiText-2 perplexity protocol). The project must run with no
hub access, so the default source is the Debian Administrator's Handbook, which every
Debian machine can fetch with ``apt-get download`` (see
shared/reference/offline-measurements.md, section 4). WikiText-2 and C4 stay available
for online runs so numbers can be compared with the literature.

Public API::

    load_text(source, cache_dir=None) -> str
    tokenize_corpus(text, tokenizer) -> torch.LongTensor            # 1-D
    split_corpus(ids, calib_samples=16, calib_seq_len=512, eval_tokens=20480,
                 eval_seq_len=512, seed=0, eval_offset=None, ...) -> TextSlices
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write_text, cache_root

__all__ = [
    "ACCEPTED_SOURCES",
    "SourceUnavailableError",
    "TextSlices",
    "cache_root",
    "handbook_text_from_html",
    "hub_unavailable_reason",
    "load_hub_dataset",
    "load_text",
    "split_corpus",
    "tokenize_corpus",
]

HANDBOOK = "debian-handbook"
WIKITEXT2 = "wikitext2"
C4 = "c4"
ACCEPTED_SOURCES: tuple[str, ...] = (HANDBOOK, WIKITEXT2, C4)
_ACCEPTED_TEXT = (
    f"'{HANDBOOK}' (offline default, fetched with apt), a path to a local text file, "
    f"'{WIKITEXT2}' or '{C4}' (these two need the Hugging Face hub)"
)

# Where the HTML lives inside the .deb; only en-US is used (the package has 26 languages).
_HANDBOOK_HTML_DIR = "usr/share/doc/debian-handbook/html/en-US/"
_HANDBOOK_MIN_PARAGRAPH = 200  # shorter blocks are headings, captions, menus, TOC lines
_APT_TIMEOUT_S = 300

# C4 validation shard used by SparseGPT / Wanda for their C4 perplexity.
_C4_REPO = "allenai/c4"
_C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
_C4_DOCS = 1100  # SparseGPT/Wanda join the first 1100 validation documents


class SourceUnavailableError(ValueError):
    """A text/fact source cannot be reached here (no apt, no hub access, ...).

    A ValueError subclass so callers that validate config values catch it too; the
    message always names an alternative that works offline.
    """


# ----------------------------------------------------------------------------- cache


# ----------------------------------------------------------------------------- loading


def load_text(source: str, cache_dir: Path | None = None) -> str:
    """Return the raw text of ``source``.

    ``source`` is one of:

    * ``"debian-handbook"``: the Debian Administrator's Handbook (en-US), ~830k chars /
      ~179k SmolLM2 tokens of modern technical prose. Fetched once with
      ``apt-get download debian-handbook`` and cached at
      ``<cache>/prune-gym/text/debian-handbook.txt`` (see :func:`cache_root`).
    * a path to an existing text file (UTF-8): returned as-is.
    * ``"wikitext2"``: WikiText-2 raw test split joined with ``"\\n\\n"`` (Wanda protocol).
    * ``"c4"``: the first 1100 documents of the allenai/c4 en validation shard 0,
      joined with ``" "`` (SparseGPT / Wanda protocol).

    The hub sources fail fast with :class:`SourceUnavailableError` when the hub is
    unreachable instead of hanging on retries.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"text source must be a non-empty string; accepted: {_ACCEPTED_TEXT}")
    name = source.strip()
    key = name.lower()
    if key == HANDBOOK:
        return _load_handbook(cache_dir)
    if key in (WIKITEXT2, "wikitext-2", "wikitext"):
        return _load_wikitext2()
    if key == C4:
        return _load_c4()

    path = Path(name).expanduser()
    if path.is_file():
        return _read_text_file(path)
    if path.is_dir():
        raise ValueError(f"text source {str(path)!r} is a directory, not a text file; accepted: {_ACCEPTED_TEXT}")
    if _looks_like_path(name):
        raise FileNotFoundError(f"text file {str(path)!r} does not exist; accepted sources: {_ACCEPTED_TEXT}")
    raise ValueError(f"unknown text source {name!r}; accepted: {_ACCEPTED_TEXT}")


def _looks_like_path(name: str) -> bool:
    """Tell a mistyped file path (FileNotFoundError) from a mistyped source name (ValueError)."""
    return (
        os.sep in name
        or "/" in name
        or name.startswith(("~", "."))
        or Path(name).suffix != ""
    )


def _read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8 ({e})") from e
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


# ----------------------------------------------------------------------------- handbook


class _HandbookParser(html.parser.HTMLParser):
    """Collect block-level text runs of one HTML page; <pre>, <head>, <script> are dropped.

    Every block tag (div, p, li, td, h1..) ends the current run, so table-of-contents
    entries and list items stay separate short runs and get filtered by length instead
    of being glued into one long junk "paragraph".
    """

    _BLOCK = frozenset(
        "address article aside blockquote body br caption dd div dl dt figcaption figure "
        "footer h1 h2 h3 h4 h5 h6 head header hr html li ol p pre section table tbody td "
        "tfoot th thead title tr ul".split()
    )
    _SKIP = frozenset(("pre", "script", "style", "head", "title"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_depth = 0

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._BLOCK:
            self._flush()
        if tag in self._SKIP:
            self._skip_depth += 1

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if tag in self._BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._BLOCK:
            self._flush()
        if tag in self._SKIP and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def handbook_text_from_html(pages: dict[str, str], min_chars: int = _HANDBOOK_MIN_PARAGRAPH) -> str:
    """Convert {file name: HTML} to text: paragraphs >= ``min_chars``, files in sorted order.

    Exposed separately so the conversion can be tested without apt.
    """
    out: list[str] = []
    for name in sorted(pages):
        parser = _HandbookParser()
        parser.feed(pages[name])
        parser.close()
        out.extend(p for p in parser.paragraphs if len(p) >= min_chars)
    return "\n\n".join(out)


def _handbook_missing_tools_error(tool: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"text source '{HANDBOOK}' needs '{tool}' (Debian/Ubuntu apt tools) to fetch the "
        f"debian-handbook package, and it was not found on PATH. Alternatives: pass a path "
        f"to a local .txt file, or use '{WIKITEXT2}' / '{C4}' when the Hugging Face hub is reachable."
    )


def _load_handbook(cache_dir: Path | str | None) -> str:
    """Return the handbook text from the cache, building it with apt on first use."""
    cache_file = cache_root(cache_dir) / "text" / f"{HANDBOOK}.txt"
    if cache_file.is_file():
        text = cache_file.read_text(encoding="utf-8")
        if text.strip():
            return text
    pages, package = _handbook_pages()
    text = handbook_text_from_html(pages)
    if not text:
        raise SourceUnavailableError(
            f"the {package} package contained no usable en-US HTML under {_HANDBOOK_HTML_DIR}"
        )
    atomic_write_text(cache_file, text)
    meta = {"source": HANDBOOK, "package": package, "html_files": len(pages),
            "paragraphs": text.count("\n\n") + 1, "chars": len(text)}
    atomic_write_text(cache_file.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return text


def _handbook_pages() -> tuple[dict[str, str], str]:
    """Return ({html file name: content}, package description) for the en-US handbook."""
    installed = Path("/") / _HANDBOOK_HTML_DIR
    if installed.is_dir() and any(installed.glob("*.html")):
        # Already installed system-wide: no download needed.
        pages = {p.name: p.read_text(encoding="utf-8") for p in installed.glob("*.html")}
        return pages, f"installed {HANDBOOK}"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _handbook_missing_tools_error(tool)
    with tempfile.TemporaryDirectory(prefix="prune-gym-handbook-") as tmp:
        deb = _apt_download(Path(tmp))
        return _html_from_deb(deb), deb.name


def _apt_download(dest: Path) -> Path:
    """``apt-get download debian-handbook`` into ``dest``; ``apt-get update`` once on failure."""
    cmd = ["apt-get", "download", "-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=30", HANDBOOK]

    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)

    res = attempt()
    if res.returncode != 0:
        upd = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
        res = attempt()
        if res.returncode != 0:
            raise SourceUnavailableError(
                f"'apt-get download {HANDBOOK}' failed (exit {res.returncode}): "
                f"{res.stderr.strip()[-500:]}; 'apt-get update' said: {upd.stderr.strip()[-300:]}. "
                f"Alternatives: a path to a local .txt file, or '{WIKITEXT2}' / '{C4}' when online."
            )
    debs = sorted(dest.glob(f"{HANDBOOK}_*.deb"))
    if not debs:
        raise SourceUnavailableError(f"'apt-get download {HANDBOOK}' succeeded but wrote no .deb in {dest}")
    return debs[-1]


def _html_from_deb(deb: Path) -> dict[str, str]:
    """Stream the data tarball out of the .deb and keep only en-US/*.html (no 100 MB extract)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    pages: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.startswith(_HANDBOOK_HTML_DIR):
                    continue
                rel = name[len(_HANDBOOK_HTML_DIR):]
                if "/" in rel or not rel.endswith(".html"):
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    pages[rel] = f.read().decode("utf-8")
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait(timeout=60)
    if rc != 0 and not pages:
        raise SourceUnavailableError(f"dpkg-deb --fsys-tarfile {deb.name} failed (exit {rc}): {stderr[-500:]}")
    return pages


# ----------------------------------------------------------------------------- hub sources


def hub_unavailable_reason(timeout_s: float = 3.0) -> str | None:
    """Return why the Hugging Face hub cannot be used, or None if it answers.

    ``datasets`` retries for minutes when offline; a single HEAD request with a short
    timeout lets callers fail fast with a useful message instead. HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE are respected (the caller then tries the local cache only).
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return None  # the server answered, so it is reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{endpoint} is unreachable ({reason})"
    return None


def _hub_offline_flag() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub_dataset(what: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` that fails fast with SourceUnavailableError when offline."""
    hint = (f"Use '{HANDBOOK}' or a path to a local text file instead"
            if what != "freebaseqa" else "Use 'offline' facts or a local JSONL file instead")
    offline = _hub_offline_flag()
    if not offline:
        reason = hub_unavailable_reason()
        if reason is not None:
            raise SourceUnavailableError(
                f"source '{what}' needs the Hugging Face hub, but {reason}. {hint} "
                f"(or set HF_HUB_OFFLINE=1 if the dataset is already in the local datasets cache)."
            )
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise SourceUnavailableError(f"source '{what}' needs the 'datasets' package. {hint}.") from e
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        state = "offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not cached" if offline else "loading failed"
        raise SourceUnavailableError(f"source '{what}': {state}: {type(e).__name__}: {e}. {hint}.") from e


def _load_wikitext2() -> str:
    ds = load_hub_dataset(WIKITEXT2, "wikitext", "wikitext-2-raw-v1", split="test")
    return "\n\n".join(ds["text"])


def _load_c4() -> str:
    ds = load_hub_dataset(C4, _C4_REPO, data_files={"validation": _C4_VALIDATION_FILE}, split="validation")
    n = min(_C4_DOCS, len(ds))
    return " ".join(ds.select(range(n))["text"])


# ----------------------------------------------------------------------------- tokenize


_SEP = "\n\n"
# Contexts a paragraph break is found in; a chunking placement is used only if it
# reproduces the one-call encoding of all of them (checked once per tokenizer call).
_BOUNDARY_PROBES = ("word.\n\nNext", "word\n\nNext", "x)\n\n(y", "1\n\n2", "end:\n\n- item", "été\n\nÉté")


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False)
    return list(enc["input_ids"])


def _chunk_placement(tokenizer: Any) -> str | None:
    """Return "next" / "prev" (which chunk carries the separator) or None if neither is exact.

    GPT-2 style pre-tokenizers (SmolLM2) split "a.\\n\\nB" as "." "\\n" "\\n" "B", so the
    separator must start the next chunk; Llama-3 style ones glue newlines to punctuation
    (".\\n\\n"), so it must end the previous chunk. Probing makes this tokenizer-agnostic.
    """
    whole = _ids(tokenizer, list(_BOUNDARY_PROBES))
    for placement in ("next", "prev"):
        parts: list[str] = []
        for probe in _BOUNDARY_PROBES:
            left, right = probe.split(_SEP)
            parts += [left, _SEP + right] if placement == "next" else [left + _SEP, right]
        split_ids = _ids(tokenizer, parts)
        if all(split_ids[2 * i] + split_ids[2 * i + 1] == w for i, w in enumerate(whole)):
            return placement
    return None


def tokenize_corpus(text: str, tokenizer: Any, paragraphs_per_chunk: int = 256) -> torch.LongTensor:
    """Tokenize ``text`` into one 1-D LongTensor, without special tokens (no BOS/EOS).

    The ids equal ``tokenizer(text, add_special_tokens=False)`` (no BOS: perplexity
    windows are cut from a stream). For speed and to avoid max-length warnings on a
    1M-token string, the text is cut into chunks of ~``paragraphs_per_chunk`` paragraphs
    and tokenized as one batch. Cuts are made only at a bare "\\n\\n" between two
    non-space characters, on the side of the separator that the probe in
    :func:`_chunk_placement` shows to be exact for this tokenizer; if no side is exact
    the text is tokenized in one call.
    """
    if not text:
        return torch.zeros(0, dtype=torch.long)
    placement = _chunk_placement(tokenizer) if text.count(_SEP) >= paragraphs_per_chunk else None
    if placement is None:
        return torch.tensor(_ids(tokenizer, [text])[0], dtype=torch.long)
    cuts = [m.start() for m in re.finditer(r"(?<=\S)\n\n(?=\S)", text)]
    chunks: list[str] = []
    pos = 0
    for cut in cuts[paragraphs_per_chunk - 1::paragraphs_per_chunk]:
        at = cut if placement == "next" else cut + len(_SEP)
        chunks.append(text[pos:at])
        pos = at
    chunks.append(text[pos:])
    flat = [t for ids in _ids(tokenizer, chunks) for t in ids]
    return torch.tensor(flat, dtype=torch.long)


# ----------------------------------------------------------------------------- split


@dataclass
class TextSlices:
    """Calibration and evaluation windows cut from one token stream, plus where they came from.

    ``calibration``: (n, calib_seq_len) random windows inside ``[0, calib_region_end)``.
    ``evaluation``: (m, eval_seq_len) contiguous non-overlapping windows covering
    ``[eval_offset, eval_offset + m * eval_seq_len)``, with ``eval_offset >= calib_region_end``.
    """

    calibration: torch.LongTensor
    evaluation: torch.LongTensor
    calib_starts: tuple[int, ...] = ()
    calib_region_end: int = 0
    eval_offset: int = 0
    total_tokens: int = 0
    seed: int = 0
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_end(self) -> int:
        return self.eval_offset + int(self.evaluation.numel())

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for result files (source, offsets, sizes, seed)."""
        n, cl = (tuple(self.calibration.shape) + (0, 0))[:2]
        m, el = (tuple(self.evaluation.shape) + (0, 0))[:2]
        return {
            "source": self.source,
            "total_tokens": self.total_tokens,
            "seed": self.seed,
            "calibration": {"samples": int(n), "seq_len": int(cl), "region": [0, self.calib_region_end],
                            "starts": list(self.calib_starts)},
            "evaluation": {"windows": int(m), "seq_len": int(el), "tokens": int(m * el),
                           "region": [self.eval_offset, self.eval_end]},
            **self.extra,
        }


def split_corpus(
    ids: torch.Tensor,
    calib_samples: int = 16,
    calib_seq_len: int = 512,
    eval_tokens: int = 20480,
    eval_seq_len: int = 512,
    seed: int = 0,
    eval_offset: int | None = None,
    calib_region_tokens: int | None = None,
    calib_fraction: float = 0.3,
    source: str | None = None,
) -> TextSlices:
    """Cut disjoint calibration and evaluation windows out of a 1-D token stream.

    Calibration (Wanda style): ``calib_samples`` windows with seeded random starts
    (``torch.Generator().manual_seed(seed)``) inside the calibration region
    ``[0, C)``. Windows may overlap each other, as in Wanda.

    Evaluation (WikiText-2 protocol): ``eval_tokens // eval_seq_len`` contiguous,
    non-overlapping windows starting at ``eval_offset``.

    Region boundary ``C``: ``calib_region_tokens`` if given; else ``eval_offset`` if
    given; else ``calib_fraction`` (30 %) of the corpus, shrunk when needed so the
    evaluation slice fits, but never below one calibration window. The evaluation slice
    defaults to start right at ``C``. Calibration and evaluation therefore never share a
    token, so a pruned model is never evaluated on its calibration text.
    """
    if ids.dim() != 1:
        raise ValueError(f"split_corpus expects 1-D token ids, got shape {tuple(ids.shape)}")
    for name, v in (("calib_seq_len", calib_seq_len), ("eval_seq_len", eval_seq_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if calib_samples < 0:
        raise ValueError(f"calib_samples must be >= 0, got {calib_samples}")
    if eval_tokens < eval_seq_len:
        raise ValueError(f"eval_tokens ({eval_tokens}) must be at least one window of eval_seq_len ({eval_seq_len})")
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")

    ids = ids.to(torch.long)
    total = int(ids.numel())
    n_eval = eval_tokens // eval_seq_len
    eval_len = n_eval * eval_seq_len
    calib_min = calib_seq_len if calib_samples > 0 else 0

    def too_small(needed: int, detail: str) -> ValueError:
        return ValueError(
            f"corpus too small: needs at least {needed} tokens ({detail}) but has {total}. "
            f"Use a longer text source or fewer/shorter windows."
        )

    if calib_region_tokens is not None:
        region_end = int(calib_region_tokens)
    elif eval_offset is not None:
        region_end = int(eval_offset)
    else:
        if total < calib_min + eval_len:
            raise too_small(calib_min + eval_len,
                            f"calibration region >= {calib_min} + evaluation {n_eval} x {eval_seq_len}")
        region_end = max(calib_min, min(int(total * calib_fraction), total - eval_len))
    start_eval = region_end if eval_offset is None else int(eval_offset)

    if region_end < calib_min:
        raise ValueError(f"calibration region [0, {region_end}) is shorter than one calibration window ({calib_seq_len})")
    if start_eval < region_end:
        raise ValueError(f"eval_offset ({start_eval}) lies inside the calibration region [0, {region_end})")
    if start_eval + eval_len > total:
        raise too_small(start_eval + eval_len, f"evaluation starts at {start_eval} and needs {n_eval} x {eval_seq_len}")

    if calib_samples > 0:
        gen = torch.Generator().manual_seed(int(seed))
        starts = torch.randint(0, region_end - calib_seq_len + 1, (calib_samples,), generator=gen)
        calibration = torch.stack([ids[s:s + calib_seq_len] for s in starts.tolist()])
        calib_starts = tuple(int(s) for s in starts.tolist())
    else:
        calibration = torch.zeros(0, calib_seq_len, dtype=torch.long)
        calib_starts = ()
    evaluation = ids[start_eval:start_eval + eval_len].reshape(n_eval, eval_seq_len).clone()
    return TextSlices(
        calibration=calibration,
        evaluation=evaluation,
        calib_starts=calib_starts,
        calib_region_end=region_end,
        eval_offset=start_eval,
        total_tokens=total,
        seed=int(seed),
        source=source,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m prune_env.data fetch [SOURCE]`: fill the text cache once (make setup runs it)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "fetch":
        print("usage: python -m prune_env.data fetch [debian-handbook|FILE|wikitext2|c4]", file=sys.stderr)
        return 2
    source = args[1] if len(args) > 1 else "debian-handbook"
    try:
        text = load_text(source)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{source}: {len(text):,} characters cached under {cache_root()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
