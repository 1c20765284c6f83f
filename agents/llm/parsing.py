"""Reading a chat model's answer: JSON extraction, validation against the profile table, repair.

Small models wrap JSON in prose, code fences or ``<think>`` blocks, use unit indices instead of names,
repeat units or write ratios as percentages. Each repair is noted (the transcript shows what was changed),
and an answer that cannot be repaired gets an error message the agent echoes back in its re-ask.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ALLOCATION_SCHEMA", "ALLOC_MAX_RATIO", "MAX_ANSWER_CHARS", "MOVE_SCHEMA", "EPS", "ParsedMove",
           "extract_json_object", "finite_or_none", "parse_move", "read_answer_allocation", "row_index",
           "truncate_text"]

MOVE_SCHEMA = '{"units": ["<unit name>", ...], "rationale": "<one line>"}'
ALLOCATION_SCHEMA = '{"ratios": {"<unit name>": <sparsity ratio in [0, 0.95]>, ...}, "rationale": "<one line>"}'
ALLOC_MAX_RATIO = 0.95
MAX_ANSWER_CHARS = 2000
"""Longest piece of an answer echoed into a re-ask prompt or stored in a transcript: a server that
answers megabytes cannot grow the prompts or the transcript without bound."""
MAX_PARSE_CHARS = 200_000
"""Longest answer searched for JSON (an allocation for hundreds of units is a few ten thousand)."""
MAX_DECODE_ATTEMPTS = 64
"""Brackets tried as the start of the JSON (prose before the answer rarely has more)."""
MAX_INT_DIGITS = 15
"""Longest integer read from an answer: unit indices and ratios are small; a longer one (a 400-digit
integer does not fit a float) makes the answer malformed, so it is re-asked and then falls back."""
EPS = 1e-9
_UNIT_KEY_ALIASES = ("units", "layers", "unit", "layer", "names", "selected", "prune", "modules")


def truncate_text(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """`text` cut to at most `limit` characters, with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [truncated: {len(text) - limit} more characters]"


def finite_or_none(x: Any) -> float | None:
    """`x` as a finite float, or None (metrics an env could not compute, numbers too large for a float)."""
    try:
        value = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _strip_think(text: str) -> str:
    """`text` without its closed <think>...</think> blocks, in one pass (an unclosed one is kept)."""
    lower, out, pos = text.lower(), [], 0
    while (start := lower.find("<think>", pos)) >= 0:
        end = lower.find("</think>", start + 7)
        if end < 0:
            break
        out.append(text[pos:start])
        pos = end + 8
    out.append(text[pos:])
    return "".join(out)


class _NumberTooLong(ValueError):
    """An integer in an answer with more than MAX_INT_DIGITS digits."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberTooLong(digits)
    return int(digits)


def extract_json_object(text: str) -> tuple[Any | None, str | None]:
    """The first JSON object in ``text`` (code fences, prose and ``<think>`` blocks tolerated).

    Falls back to the first JSON list when there is no object. Returns ``(value, None)`` or
    ``(None, error message)``.
    """
    if not isinstance(text, str) or not text.strip():
        return None, "the answer was empty"
    if len(text) > MAX_PARSE_CHARS:  # the scan below tries a decode at every brace: keep it cheap
        return None, (f"the answer has {len(text)} characters, more than the {MAX_PARSE_CHARS} read; "
                      "answer with the short JSON object only")
    clean = _strip_think(text)
    dec = json.JSONDecoder(parse_int=_bounded_int)
    first_list, too_long = None, 0
    starts = (i for i, ch in enumerate(clean) if ch in "{[")
    for attempt, i in enumerate(starts):
        if attempt == MAX_DECODE_ATTEMPTS:  # each try may read to the end: a bounded number keeps it linear
            break
        try:
            obj, _ = dec.raw_decode(clean, i)
        except _NumberTooLong as exc:
            too_long = max(too_long, len(str(exc).lstrip("-")))
            continue
        except (json.JSONDecodeError, RecursionError):  # deeply nested brackets
            continue
        if isinstance(obj, dict):
            return obj, None
        if isinstance(obj, list) and first_list is None:
            first_list = obj
    if first_list is not None:
        return first_list, None
    if too_long:
        return None, (f"the answer holds an integer of {too_long} digits (at most {MAX_INT_DIGITS} are read); "
                      "name units by their names, and give ratios as numbers in [0, 0.95]")
    if "{" in clean:
        return None, "the answer contains no valid JSON object (malformed JSON: check quotes, commas and braces)"
    return None, "the answer contains no JSON object"


@dataclass
class ParsedMove:
    """A move read from an answer: the units (repaired), the rationale, the repairs made, or the error."""

    units: list[str]
    rationale: str
    repairs: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.units)


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value from an answer, cut so a repair note stays one short line."""
    return truncate_text(repr(value), limit)


def row_index(row: dict, pos: int) -> int:
    """The unit index of a profile row (its position when the row has none)."""
    try:
        return int(row.get("index", pos))
    except (TypeError, ValueError):
        return pos


def _resolve_unit(item: Any, names: set[str], lower: dict[str, str], by_index: dict[int, str]):
    """(unit name or None, repair note or None)."""
    if isinstance(item, dict):
        for k in ("unit", "name", "layer", "index", "idx"):
            if k in item:
                name, note = _resolve_unit(item[k], names, lower, by_index)
                return name, note or f"took {k!r} from object entry"
        return None, f"dropped entry {json.dumps(item)[:60]} (no unit name)"
    if isinstance(item, bool):
        return None, f"dropped non-unit entry {_short(item)}"
    if isinstance(item, (int, float)):
        index = item if isinstance(item, int) else int(item) if item.is_integer() else None  # inf/nan: None
        if index in by_index:
            return by_index[index], f"index {index} read as {by_index[index]}"
        return None, f"dropped unknown index {_short(item)}"
    if isinstance(item, str):
        s = item.strip().strip("`'\"")
        if s in names:
            return s, None if s == item else f"normalised {_short(item)}"
        if s.lower() in lower:
            return lower[s.lower()], f"matched {_short(item)} case-insensitively"
        m = re.fullmatch(r"#?\s*(\d{1,%d})" % MAX_INT_DIGITS, s)
        if m and int(m.group(1)) in by_index:
            return by_index[int(m.group(1))], f"index {s!r} read as {by_index[int(m.group(1))]}"
        return None, f"dropped unknown unit {_short(item)}"
    return None, f"dropped non-unit entry {_short(item)}"


def parse_move(
    text: str,
    table: list[dict],
    *,
    max_sparsity: float,
    max_units: int,
) -> ParsedMove:
    """Extract, validate and repair a move ``{"units": [...], "rationale": "..."}``.

    Repairs (each noted): unknown names dropped, indices mapped to names, duplicates removed,
    units at the per-unit cap dropped, the list truncated to ``max_units``. An error is set
    when the JSON is malformed / missing or no valid unit remains.
    """
    obj, err = extract_json_object(text)
    if err is not None:
        return ParsedMove([], "", [], err)
    repairs: list[str] = []
    rationale = ""
    if isinstance(obj, list):
        raw_units: Any = obj
        repairs.append("answer was a bare JSON list; read it as the units")
    else:
        key = next((k for k in _UNIT_KEY_ALIASES if k in obj), None)
        if key is None:
            return ParsedMove([], "", [], 'the JSON object has no "units" list')
        if key != "units":
            repairs.append(f'read key "{key}" as "units"')
        raw_units = obj[key]
        r = obj.get("rationale", obj.get("reason", obj.get("reasoning", "")))
        rationale = " ".join(str(r).split())[:400] if r is not None else ""
        if not rationale:
            repairs.append("no rationale given")
    if isinstance(raw_units, (str, int, float, dict)) and not isinstance(raw_units, bool):
        raw_units = [raw_units]
        repairs.append('"units" was a single value; wrapped it in a list')
    if not isinstance(raw_units, list):
        return ParsedMove([], rationale, repairs, '"units" must be a list of unit names')

    names = {str(r["unit"]) for r in table}
    lower = {n.lower(): n for n in names}
    by_index = {row_index(r, i): str(r["unit"]) for i, r in enumerate(table)}
    sparsity = {str(r["unit"]): float(r.get("sparsity", 0.0)) for r in table}
    chosen: list[str] = []
    for item in raw_units:
        name, note = _resolve_unit(item, names, lower, by_index)
        if note:
            repairs.append(note)
        if name is None:
            continue
        if name in chosen:
            repairs.append(f"removed duplicate {name}")
            continue
        if sparsity.get(name, 0.0) >= max_sparsity - EPS:
            repairs.append(f"dropped {name}: already at the max sparsity {max_sparsity:.0%}")
            continue
        chosen.append(name)
    if len(chosen) > max_units:
        repairs.append(f"truncated {len(chosen)} units to the first {max_units}")
        chosen = chosen[:max_units]
    if not chosen:
        detail = "; ".join(repairs[-5:])
        return ParsedMove([], rationale, repairs,
                          "no valid unit remained after repair" + (f" ({detail})" if detail else ""))
    return ParsedMove(chosen, rationale, repairs, None)


def read_answer_allocation(text: str, table: list[dict], *, max_ratio: float = ALLOC_MAX_RATIO,
                     fill: float = 0.0) -> tuple[list[float] | None, str, list[str], str | None]:
    """Parse ``{"ratios": {unit: ratio}}`` (or a list by index). Returns (ratios in table
    order or None, rationale, repairs, error). Percentages are read as fractions, values are
    clipped to [0, max_ratio]; missing units (at most half) are filled with ``fill``."""
    obj, err = extract_json_object(text)
    if err is not None:
        return None, "", [], err
    repairs: list[str] = []
    rationale = ""
    if isinstance(obj, dict):
        raw = obj.get("ratios", obj.get("allocation", obj.get("sparsity")))
        if raw is None:
            if obj and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj.values()):
                raw = obj
                repairs.append('read the top-level object as "ratios"')
            else:
                return None, "", [], 'the JSON object has no "ratios" object'
        rationale = " ".join(str(obj.get("rationale", "")).split())[:400]
    else:
        raw = obj
        repairs.append("answer was a bare JSON list; read it as ratios by index")
    names = [str(r["unit"]) for r in table]
    lower = {n.lower(): n for n in names}
    by_index = {row_index(r, i): str(r["unit"]) for i, r in enumerate(table)}
    values: dict[str, float] = {}
    items = list(raw.items()) if isinstance(raw, dict) else list(enumerate(raw)) if isinstance(raw, list) else None
    if items is None:
        return None, rationale, repairs, '"ratios" must map unit names to numbers'
    for key, val in items:
        name, note = _resolve_unit(key, set(names), lower, by_index)
        if note and not note.startswith("index"):
            repairs.append(note)
        if name is None:
            continue
        v = finite_or_none(val.rstrip("%") if isinstance(val, str) else val)
        if v is None:
            repairs.append(f"dropped non-numeric ratio for {name}: {_short(val)}")
            continue
        if 1.0 < v <= 100.0:
            repairs.append(f"read {name}={v:g} as a percentage")
            v /= 100.0
        if v < 0.0 or v > max_ratio:
            repairs.append(f"clipped {name}={v:g} to [0, {max_ratio}]")
            v = min(max(v, 0.0), max_ratio)
        if name in values:
            repairs.append(f"duplicate ratio for {name}; kept the first")
            continue
        values[name] = v
    missing = [n for n in names if n not in values]
    if len(missing) * 2 > len(names):
        return None, rationale, repairs, (
            f"ratios given for only {len(values)} of {len(names)} units; give a ratio for every unit")
    if missing:
        repairs.append(f"filled {len(missing)} missing unit(s) with {fill:.3f}: {', '.join(missing[:8])}")
    return [values.get(n, fill) for n in names], rationale, repairs, None
