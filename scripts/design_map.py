"""Keep docs/DESIGN.md's module map true: every module listed once, with its current line count.

    python scripts/design_map.py            # check: exit 1 and name each disagreement
    python scripts/design_map.py --write    # refresh the line counts in place (descriptions stay hand-written)

A new module has no description yet, so it is never added silently: the check names it and asks for a row.
tests/test_design_map.py runs the check, so a module added, removed or grown without the map fails `make test`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
PACKAGES = ("prune_env", "agents", "prune_bench", "training")
LOOSE = ("train.py", "benchmark.py", "scripts/*.py", "examples/*.py")
ROW = re.compile(r"^\| `(?P<path>[^`]+\.py)` \| (?P<lines>\d+) \| (?P<owns>.*) \|$")


def modules(root: Path = ROOT) -> dict[str, int]:
    """Every Python module of the code (not tests) -> its number of lines, as `wc -l` counts them."""
    paths = [p for package in PACKAGES for p in (root / package).rglob("*.py")]
    paths += [p for pattern in LOOSE for p in root.glob(pattern)]
    return {p.relative_to(root).as_posix(): p.read_bytes().count(b"\n") for p in paths
            if "__pycache__" not in p.parts}


def map_rows(text: str) -> dict[str, int]:
    """The module map's rows: path -> the line count it states."""
    rows: dict[str, int] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            path = match["path"]
            if path in rows:
                raise ValueError(f"docs/DESIGN.md lists {path} twice in its module map")
            rows[path] = int(match["lines"])
    return rows


def disagreements(text: str, actual: dict[str, int]) -> list[str]:
    """What the map says that the code does not (empty when the map is true)."""
    rows = map_rows(text)
    problems = [f"{path}: not in the module map (add a row saying what it owns)"
                for path in sorted(set(actual) - set(rows))]
    problems += [f"{path}: in the module map but not in the code (remove its row)" for path in sorted(set(rows) - set(actual))]
    problems += [f"{path}: the map says {rows[path]} lines, the file has {actual[path]} (python scripts/design_map.py --write)"
                 for path in sorted(set(rows) & set(actual)) if rows[path] != actual[path]]
    return problems


def refresh_counts(text: str, actual: dict[str, int]) -> str:
    """The same text with each listed module's line count replaced by the current one."""
    def fix(line: str) -> str:
        match = ROW.match(line)
        if not match or match["path"] not in actual:
            return line
        return f"| `{match['path']}` | {actual[match['path']]} | {match['owns']} |"
    return "\n".join(fix(line) for line in text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the line counts in docs/DESIGN.md")
    args = parser.parse_args(argv)
    actual = modules()
    text = DESIGN.read_text(encoding="utf-8")
    if args.write:
        text = refresh_counts(text, actual)
        DESIGN.write_text(text, encoding="utf-8")
    problems = disagreements(text, actual)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
