"""The agent's self-reflection memory (its past moves and their outcomes) and its JSONL transcript.

The memory is what makes the prompt loop more than a greedy pick: every prompt shows the last moves,
their perplexity and fact-accuracy changes, whether the env rolled them back, and the model's own
rationale. The transcript records every prompt, answer, repair and outcome, one JSON line per event,
written as it happens so a crashed episode still leaves its record; its strings are bounded.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.llm.parsing import truncate_text
from prune_env.files import to_jsonable

__all__ = ["MAX_TRANSCRIPT_STRING", "Memory", "MemoryEntry", "Transcript"]

MAX_TRANSCRIPT_STRING = 20_000
"""Longest string a transcript line keeps (a prompt with its profile table and memory is a few thousand
characters; anything longer is an answer or error that ran away)."""


@dataclass
class MemoryEntry:
    """One past move and its outcome (the self-reflection memory)."""

    iteration: int
    units: list[str]
    source: str  # "llm", "candidate-scoring" or "fallback:zscore-greedy"
    rationale: str
    rolled_back: bool
    ppl_before: float | None
    ppl_after: float | None
    ppl_increase: float | None
    fact_acc_before: float | None
    fact_acc_after: float | None
    sparsity_before: float | None
    sparsity_after: float | None
    reward: float | None = None

    def describe(self) -> str:
        def num(x, fmt):
            return "?" if x is None else format(x, fmt)

        head = f"#{self.iteration} units [{', '.join(self.units)}]"
        if self.source.startswith("fallback"):
            head += " (picked by the zscore-greedy fallback because your answers were invalid)"
        metrics = []
        delta = None
        if self.ppl_before and self.ppl_after is not None:
            delta = self.ppl_after / self.ppl_before - 1.0
        if self.rolled_back and (delta is None or abs(delta) < 1e-12) and self.ppl_increase is not None:
            metrics.append(f"ppl {num(self.ppl_before, '.2f')}, attempted rise {self.ppl_increase:+.1%}")
        else:
            d = delta if delta is not None else self.ppl_increase
            metrics.append(f"ppl {num(self.ppl_before, '.2f')} -> {num(self.ppl_after, '.2f')}"
                           + (f" ({d:+.1%})" if d is not None else ""))
        if self.fact_acc_after is not None:
            da = (self.fact_acc_after - self.fact_acc_before) if self.fact_acc_before is not None else None
            metrics.append(f"fact acc {num(self.fact_acc_before, '.3f')} -> {self.fact_acc_after:.3f}"
                           + (f" ({da:+.3f})" if da is not None else ""))
        if self.rolled_back:
            verdict = ("ROLLED BACK (perplexity degradation above the threshold; the model was restored "
                       "and this move did not count)")
        else:
            verdict = (f"accepted, global sparsity {num(self.sparsity_before, '.1%')} -> "
                       f"{num(self.sparsity_after, '.1%')}")
        text = f"{head}: {', '.join(metrics)} => {verdict}."
        if self.rationale:
            text += f' Your rationale: "{self.rationale}"'
        return text


class Memory:
    """The last `size` moves (oldest first) plus what the fallback and the re-ask checks need from them."""

    def __init__(self, size: int) -> None:
        self.entries: deque[MemoryEntry] = deque(maxlen=max(int(size), 1))
        self.moves = 0

    def clear(self) -> None:
        self.entries.clear()
        self.moves = 0

    def add(self, entry: MemoryEntry) -> None:
        self.entries.append(entry)
        self.moves += 1

    @property
    def omitted(self) -> int:
        """Moves older than the window (the prompt says how many it leaves out)."""
        return self.moves - len(self.entries)

    def blocked_units(self, cooldown: int) -> set[str]:
        """Units of moves rolled back within the last `cooldown` moves (the fallback avoids them)."""
        if cooldown <= 0:
            return set()
        return {unit for entry in list(self.entries)[-cooldown:] if entry.rolled_back for unit in entry.units}

    def repeats_rollback(self, units: list[str]) -> bool:
        """True when `units` is exactly the move the env rolled back last step (the model is unchanged,
        so it would be rolled back again)."""
        if not self.entries:
            return False
        last = self.entries[-1]
        return last.rolled_back and set(last.units) == set(units)


def _bounded(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return truncate_text(value, limit)
    if isinstance(value, dict):
        return {key: _bounded(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [_bounded(item, limit) for item in value]
    return value


class Transcript:
    """JSONL transcript of one episode (None path: nothing is written).

    The first record replaces an older file of the same name; each record is flushed at once. Every
    string is cut to `max_string` characters (marked as truncated), so an answer of megabytes costs the
    transcript a few kilobytes.
    """

    def __init__(self, path: str | Path | None, max_string: int = MAX_TRANSCRIPT_STRING) -> None:
        self.path = Path(path) if path is not None else None
        self.max_string = int(max_string)
        self._started = False

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if self._started else "w"
        self._started = True
        line = json.dumps(_bounded(to_jsonable(record), self.max_string), ensure_ascii=False)
        with self.path.open(mode, encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
