"""Files on disk: the one cache root, writes that never leave a half-written file or folder, JSON
conversion, safe file names, and the lock that gives an output folder a single writer."""

from __future__ import annotations

import fcntl
import json
import math
import numbers
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
# What decoding a damaged cache file raises: bad bytes or JSON (ValueError covers UnicodeDecodeError and
# JSONDecodeError), a torch/pickle archive that is truncated or garbage, fields that do not fit.
_CACHE_DECODE_ERRORS = (ValueError, TypeError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError,
                        zipfile.BadZipFile)


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


STAGING_PREFIX = ".staging-"  # staged_files' folders: a killed run's leftover is recognised by it


@contextmanager
def staged_files(directory: str | Path, last: str | None = None) -> Iterator[Path]:
    """Write into a hidden folder inside `directory`; on success each file moves into `directory`, `last`
    at the end (its presence then means the others are there).

    Unlike `staged_directory`, `directory` itself stays (it may hold a lock file); an error removes the
    staging folder and leaves `directory` as it was.
    """
    directory = Path(directory)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        yield staging
        for name in sorted(p.name for p in staging.iterdir() if p.name != last) + ([last] if last else []):
            (staging / name).rename(directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """`to_jsonable(data)` written atomically (strict JSON: NaN and infinities become null)."""
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=indent, allow_nan=False) + "\n")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy / torch scalars and arrays, tuples, Paths and dataclass-free dicts.

    Non-finite floats become None, so every file this project writes is strict JSON that any parser reads.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return to_jsonable(float(value))
    return str(value)


def safe_name(text: str) -> str:
    """A file name made from `text`: letters, digits, '-', '_' and '.' kept, anything else '-'."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text)).strip(".")
    return name or "-"


class OutputLockedError(RuntimeError):
    """Another process is writing the same output folder."""


LOCK_NAME = ".prune-gym.lock"


@contextmanager
def output_lock(directory: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (created if needed) for as long as the block runs.

    A second writer (another process, or this one) gets OutputLockedError at once instead of
    interleaving its results with the first one's. The lock is an `flock` on a small file inside
    the folder, so it is released by the kernel when the holder dies (kill -9 included).
    """
    directory = Path(directory)
    check_writable_dir(directory, what)
    lock_file = directory / LOCK_NAME
    handle = open(lock_file, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputLockedError(
                f"{what} {str(directory)!r} is in use by {holder}: wait for it to finish or choose another "
                f"folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield directory
    finally:
        handle.close()  # closing the descriptor releases the flock


def check_writable_dir(directory: str | Path, what: str = "output folder") -> Path:
    """Create `directory` if needed and prove a file can be written there, before any long work starts."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{what} {str(directory)!r} exists and is not a folder: choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise PermissionError(f"{what} {str(directory)!r} is not writable ({error.strerror}): "
                              f"choose a folder you can write to") from None
    return directory


def read_cache(path: str | Path, load: Callable[[Path], T]) -> T | None:
    """`load(path)` for a cache file, or None when the file is missing or unreadable.

    A cache can always be rebuilt, so a corrupt one (binary garbage, a truncated write from an old
    version, a changed format) must not block every later run: it is deleted with a warning that names
    it and the caller rebuilds it. `load` should build the final object, so a file that parses but has
    the wrong fields counts as corrupt too. Never use this for a user's own files: those are errors.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path)
    except _CACHE_DECODE_ERRORS as error:
        warnings.warn(f"cache file {str(path)!r} is unreadable ({type(error).__name__}: {error}); "
                      f"deleted, it will be rebuilt", RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def read_cache_json(path: str | Path) -> Any | None:
    """The JSON value of a cache file, or None when it is missing or corrupt (see `read_cache`)."""
    return read_cache(path, lambda p: json.loads(p.read_text(encoding="utf-8")))
