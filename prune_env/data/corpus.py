"""Text sources: where the calibration and evaluation text comes from.

Why this module exists: the project must run with no hub access, so the default source is the
Debian Administrator's Handbook, which every Debian machine can fetch with ``apt-get download``
(README, "Offline defaults, and going online"); a local UTF-8 text file works anywhere;
WikiText-2 and C4 stay available for online runs so numbers can be compared with the literature.
Tokenising and cutting windows out of the text is `prune_env.data.windows`'s job.

Public API::

    load_text(source, cache_dir=None) -> str
    load_hub_dataset(what, *args, **kwargs)    # datasets.load_dataset that fails fast offline
    hub_unavailable_reason(timeout_s=3.0) -> str | None
    handbook_text_from_html(pages, min_chars=200) -> str
    SourceUnavailableError, ACCEPTED_SOURCES
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
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, cache_root, read_cache

__all__ = [
    "ACCEPTED_SOURCES",
    "SourceUnavailableError",
    "handbook_text_from_html",
    "hub_unavailable_reason",
    "load_hub_dataset",
    "load_text",
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
    """Return the handbook text from the cache, building it with apt on first use.

    A cache file that is not UTF-8 text (a damaged disk, an interrupted copy) is deleted with a
    warning naming it and rebuilt, so it never blocks later runs."""
    cache_file = cache_root(cache_dir) / "text" / f"{HANDBOOK}.txt"
    text = read_cache(cache_file, lambda path: path.read_text(encoding="utf-8"))
    if text is not None and text.strip():
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
        pages = {p.name: _read_installed_page(p) for p in installed.glob("*.html")}
        return pages, f"installed {HANDBOOK}"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _handbook_missing_tools_error(tool)
    with tempfile.TemporaryDirectory(prefix="prune-gym-handbook-") as tmp:
        deb = _apt_download(Path(tmp))
        return _html_from_deb(deb), deb.name


def _read_installed_page(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SourceUnavailableError(f"installed handbook page {str(path)!r} is not UTF-8 HTML ({error}): "
                                     f"reinstall the {HANDBOOK} package or use a local .txt file") from None


def _apt_download(dest: Path) -> Path:
    """``apt-get download debian-handbook`` into ``dest``.

    Only a download into a temporary folder: a library must not change the machine's package
    state, so a stale package list is the user's to refresh (the error says how)."""
    cmd = ["apt-get", "download", "-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=30", HANDBOOK]
    res = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
    if res.returncode != 0:
        detail = " ".join(res.stderr.strip()[-500:].split())
        raise SourceUnavailableError(
            f"'apt-get download {HANDBOOK}' failed (exit {res.returncode}): {detail}. If the package list is "
            f"stale, run 'sudo apt-get update' and retry; alternatives: a path to a local .txt file, or "
            f"'{WIKITEXT2}' / '{C4}' when online."
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
                    try:
                        pages[rel] = f.read().decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise SourceUnavailableError(
                            f"{deb.name}: {name} is not UTF-8 HTML ({error}); the downloaded package is "
                            f"damaged: delete it and retry, or use a local .txt file") from None
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
