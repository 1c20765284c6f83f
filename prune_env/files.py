"""Files on disk: the one cache root, and writes that never leave a half-written file or folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Return ``<cache>/prune-gym``.

    ``<cache>`` is ``cache_dir`` if given, else $PRUNE_GYM_CACHE, else $XDG_CACHE_HOME,
    else ~/.cache. One root for the whole project (text, profiles, dense metrics, models) so a
    CI job can point everything at a scratch directory with a single variable.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("PRUNE_GYM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache"
    return base / "prune-gym"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; it replaces `path` only when the block succeeds.

    Readers see the old or the new file, never a mix, and a killed run leaves no truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Write into a hidden sibling folder, renamed onto `target` only when the block succeeds.

    An error (or Ctrl-C) removes the staging folder, so `target` is never left half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
