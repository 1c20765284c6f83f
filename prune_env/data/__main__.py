"""`python -m prune_env.data fetch [SOURCE]`: fill the text cache once (make setup runs it)."""

from __future__ import annotations

import sys

from ..files import cache_root
from .corpus import load_text


def main(argv: list[str] | None = None) -> int:
    """Fetch SOURCE (default the Debian handbook) into the cache; exit status 2 on bad input."""
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
