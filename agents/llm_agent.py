"""LLM-prompted pruning agent (arXiv 2601.09694): sensitivity profile in, JSON move out.

Each iteration of IterativePrune the agent shows the chat model the per-unit sensitivity
profile (z-scored Wanda and gradient importance, current sparsity, parameter share), the
global sparsity, the target and the budget left, plus a rolling memory of its own past moves
and their outcomes (perplexity and fact accuracy before/after, accepted or rolled back, its
own rationale): that memory is the self-reflection. The answer ``{"units": [...],
"rationale": "..."}`` is extracted, validated and repaired; invalid answers are re-asked with
the error appended, and after ``max_invalid`` invalid answers the agent falls back to the
z-score greedy pick. A backend with ``choose()`` (the small local model) is driven by
candidate scoring instead: the agent builds a handful of valid moves and the model picks one.
The env does the checkpoint rollback itself; the agent only records it.

Env contract (IterativePrune-v0), read through ``env.unwrapped``: ``unit_names``,
``profile_table()`` (rows with ``unit, index, z_wanda, z_grad, sparsity, param_share``),
``global_sparsity``, ``target_sparsity``, ``max_sparsity``, ``increment``; ``env.action_space``
is ``MultiBinary(n_units)``; ``step`` info has ``ppl, fact_acc, fact_nll, fact_retention,
achieved_sparsity, rolled_back, rollbacks, ppl_increase``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.allocators import match_budget, zscore_greedy_pick
from agents.llm_backends import LLMBackendError

log = logging.getLogger(__name__)

__all__ = [
    "LLMPruningAgent",
    "MemoryEntry",
    "ParsedMove",
    "extract_json_object",
    "parse_move",
    "parse_allocation",
    "format_profile_table",
    "zscore_greedy",
    "budget_match",
    "MOVE_SCHEMA",
    "ALLOCATION_SCHEMA",
    "ALLOC_MAX_RATIO",
]

MOVE_SCHEMA = '{"units": ["<unit name>", ...], "rationale": "<one line>"}'
ALLOCATION_SCHEMA = '{"ratios": {"<unit name>": <sparsity ratio in [0, 0.95]>, ...}, "rationale": "<one line>"}'
ALLOC_MAX_RATIO = 0.95
_EPS = 1e-9
_UNIT_KEY_ALIASES = ("units", "layers", "unit", "layer", "names", "selected", "prune", "modules")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Best-effort conversion to JSON-serialisable values (numpy, tensors, paths)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, deque)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        try:
            return _jsonable(x.tolist())
        except Exception:
            pass
    return repr(x)


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def extract_json_object(text: str) -> tuple[Any | None, str | None]:
    """The first JSON object in ``text`` (code fences, prose and ``<think>`` blocks tolerated).

    Falls back to the first JSON list when there is no object. Returns ``(value, None)`` or
    ``(None, error message)``.
    """
    if not isinstance(text, str) or not text.strip():
        return None, "the answer was empty"
    clean = _THINK.sub("", text)
    dec = json.JSONDecoder()
    first_list = None
    for i, ch in enumerate(clean):
        if ch not in "{[":
            continue
        try:
            obj, _ = dec.raw_decode(clean, i)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj, None
        if isinstance(obj, list) and first_list is None:
            first_list = obj
    if first_list is not None:
        return first_list, None
    if "{" in clean:
        return None, "the answer contains no valid JSON object (malformed JSON: check quotes, commas and braces)"
    return None, "the answer contains no JSON object"


@dataclass
class ParsedMove:
    units: list[str]
    rationale: str
    repairs: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.units)


def _row_index(row: dict, pos: int) -> int:
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
        return None, f"dropped non-unit entry {item!r}"
    if isinstance(item, (int, float)):
        if float(item).is_integer() and int(item) in by_index:
            return by_index[int(item)], f"index {int(item)} read as {by_index[int(item)]}"
        return None, f"dropped unknown index {item!r}"
    if isinstance(item, str):
        s = item.strip().strip("`'\"")
        if s in names:
            return s, None if s == item else f"normalised {item!r}"
        if s.lower() in lower:
            return lower[s.lower()], f"matched {item!r} case-insensitively"
        m = re.fullmatch(r"#?\s*(\d+)", s)
        if m and int(m.group(1)) in by_index:
            return by_index[int(m.group(1))], f"index {s!r} read as {by_index[int(m.group(1))]}"
        return None, f"dropped unknown unit {item!r}"
    return None, f"dropped non-unit entry {item!r}"


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
    by_index = {_row_index(r, i): str(r["unit"]) for i, r in enumerate(table)}
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
        if sparsity.get(name, 0.0) >= max_sparsity - _EPS:
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


def zscore_greedy(table: list[dict], max_sparsity: float, k: int,
                  blocked: set[str] | None = None) -> list[str]:
    """The ``k`` units with the lowest ``z_wanda + z_grad`` below the cap (ties: lower index).

    `agents.allocators.zscore_greedy_pick` with the blocked units passed as capped.
    """
    blocked = blocked or set()
    zw = [float(r["z_wanda"]) for r in table]
    zg = [float(r["z_grad"]) for r in table]
    eff = [max(max_sparsity, 1.0) if str(r["unit"]) in blocked else float(r["sparsity"]) for r in table]
    return [str(table[i]["unit"]) for i in zscore_greedy_pick(zw, zg, eff, max_sparsity, k)]


def budget_match(ratios: list[float], numel: list[float], target: float,
                 max_ratio: float = ALLOC_MAX_RATIO) -> list[float]:
    """Shift ``ratios`` (clipped to [0, max_ratio]) so the numel-weighted mean equals ``target``
    (`agents.allocators.match_budget`, target clipped into [0, max_ratio])."""
    r = np.clip(np.asarray(ratios, dtype=float), 0.0, max_ratio)
    tgt = float(np.clip(target, 0.0, max_ratio))
    return [float(x) for x in match_budget(r.tolist(), list(numel), tgt, high=max_ratio)]


def parse_allocation(text: str, table: list[dict], *, max_ratio: float = ALLOC_MAX_RATIO,
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
    by_index = {_row_index(r, i): str(r["unit"]) for i, r in enumerate(table)}
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
        v = _f(val.rstrip("%") if isinstance(val, str) else val)
        if v is None:
            repairs.append(f"dropped non-numeric ratio for {name}: {val!r}")
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


def format_profile_table(table: list[dict], max_sparsity: float) -> str:
    """Fixed-width text table of the sensitivity profile (rows at the cap marked CAP)."""
    rows = sorted(enumerate(table), key=lambda p: _row_index(p[1], p[0]))
    width = max([4] + [len(str(r["unit"])) for _, r in rows])
    lines = [f"{'idx':>3}  {'unit':<{width}}  {'z_wanda':>7}  {'z_grad':>7}  {'z_sum':>7}  {'sparsity':>8}  {'share':>6}"]
    for pos, r in rows:
        zw, zg = float(r["z_wanda"]), float(r["z_grad"])
        sp = float(r["sparsity"])
        cap = "  CAP" if sp >= max_sparsity - _EPS else ""
        lines.append(
            f"{_row_index(r, pos):>3}  {str(r['unit']):<{width}}  {zw:>+7.2f}  {zg:>+7.2f}  {zw + zg:>+7.2f}"
            f"  {sp:>8.1%}  {float(r.get('param_share', 0.0)):>6.1%}{cap}"
        )
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------
# the agent
# --------------------------------------------------------------------------------------


class _Transcript:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._started = False

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if self._started else "w"
        self._started = True
        with self.path.open(mode, encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
            fh.flush()


class LLMPruningAgent:
    """Plays IterativePrune-v0 with an LLM (``run``) or allocates for LayerPrune-v0 (``allocate``).

    ``max_invalid``: invalid answers tolerated per decision; after that many the agent falls
    back to zscore-greedy. ``memory_size``: past moves shown in the prompt.
    ``use_candidates``: None = candidate scoring iff the backend has ``choose``.
    ``on_backend_error``: "raise" (default; the error is logged to the transcript first) or
    "fallback" (use zscore-greedy for that decision).
    """

    name = "llm"

    def __init__(
        self,
        backend,
        max_units_per_step: int = 4,
        max_invalid: int = 3,
        memory_size: int = 12,
        transcript_path: str | Path | None = None,
        seed: int = 0,
        *,
        use_candidates: bool | None = None,
        on_backend_error: str = "raise",
        rollback_cooldown: int = 3,
        max_iterations: int | None = None,
    ) -> None:
        if max_units_per_step < 1:
            raise ValueError("max_units_per_step must be >= 1")
        if max_invalid < 1:
            raise ValueError("max_invalid must be >= 1")
        if on_backend_error not in ("raise", "fallback"):
            raise ValueError("on_backend_error must be 'raise' or 'fallback'")
        self.backend = backend
        self.max_units_per_step = int(max_units_per_step)
        self.max_invalid = int(max_invalid)
        self.memory_size = int(memory_size)
        self.transcript_path = Path(transcript_path) if transcript_path is not None else None
        self.seed = int(seed)
        self.use_candidates = (callable(getattr(backend, "choose", None))
                               if use_candidates is None else bool(use_candidates))
        self.on_backend_error = on_backend_error
        self.rollback_cooldown = int(rollback_cooldown)
        self.max_iterations = max_iterations
        self.memory: deque[MemoryEntry] = deque(maxlen=max(self.memory_size, 1))
        self.n_moves = 0
        self._transcript = _Transcript(self.transcript_path)
        self._reset_counters()

    @property
    def llm_model(self) -> str:
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    @property
    def mode(self) -> str:
        return "candidate-scoring" if self.use_candidates else "json"

    def _reset_counters(self) -> None:
        self.fallbacks = 0
        self.invalid_answers = 0
        self.repaired_answers = 0

    # -- prompts ---------------------------------------------------------------------
    def system_prompt(self, increment: float, max_sparsity: float) -> str:
        k = self.max_units_per_step
        return (
            "You are a pruning agent. You compress a language model by unstructured (Wanda-style) "
            "weight pruning, one step at a time.\n"
            f"Each step you choose 1 to {k} units (decoder blocks or linear layers); each chosen unit "
            f"gets {increment:.1%} more sparsity (its weakest remaining weights are zeroed). After the "
            "step the environment measures perplexity (lower is better) and fact-recall accuracy. If "
            "perplexity degrades by more than its threshold, the step is ROLLED BACK (undone).\n"
            "Goal: reach the target global sparsity while keeping perplexity low and factual knowledge "
            "intact.\n"
            "Sensitivity profile columns:\n"
            "- z_wanda: z-score across units of the 10th percentile of the Wanda score |W|*||X|| of the "
            "surviving weights (low = its weakest weights matter little).\n"
            "- z_grad: z-score across units of the mean |gradient| of the LM loss (low = less important).\n"
            "- z_sum = z_wanda + z_grad: combined importance; lower is safer to prune.\n"
            f"- sparsity: current fraction of zeroed weights; units marked CAP are at the per-unit maximum "
            f"{max_sparsity:.0%} and cannot be chosen.\n"
            f"- share: the unit's fraction of all prunable weights; a chosen unit raises global sparsity by "
            f"about share x {increment:.1%}.\n"
            "Rules:\n"
            f"- Choose between 1 and {k} distinct units by their exact name from the unit column (an idx "
            "number is accepted too); never a CAP unit.\n"
            "- Prefer units with low z_sum, spread pruning across units instead of hammering one, and "
            "learn from your memory: avoid repeating moves that were rolled back or hurt fact accuracy.\n"
            "- Reply with ONLY one JSON object, no other text, exactly of this form:\n"
            f"{MOVE_SCHEMA}"
        )

    def user_prompt(self, table: list[dict], *, iteration: int, global_sparsity: float,
                    target: float, max_sparsity: float, increment: float) -> str:
        left = max(target - global_sparsity, 0.0)
        lines = [
            f"Step {iteration}. Global sparsity {global_sparsity:.2%}, target {target:.2%}, "
            f"budget left {left:.2%} of all prunable weights.",
            f"Per-unit increment {increment:.1%}, per-unit cap {max_sparsity:.0%}, at most "
            f"{self.max_units_per_step} units per step.",
            "",
            "Sensitivity profile:",
            format_profile_table(table, max_sparsity),
            "",
        ]
        if self.memory:
            omitted = self.n_moves - len(self.memory)
            lines.append("Memory of your past moves and their outcomes (oldest first"
                         + (f"; {omitted} earlier move(s) omitted" if omitted > 0 else "") + "):")
            lines.extend(e.describe() for e in self.memory)
            lines.append("")
            lines.append(
                "Reflect on this memory before choosing: which moves raised perplexity or lowered fact "
                "accuracy, which were cheap, and why were any rolled back? Put that lesson and the reason "
                "for your choice in the one-line rationale."
            )
        else:
            lines.append("Memory of your past moves: none yet (this is the first move).")
        lines.append(f"Answer with the JSON object only: {MOVE_SCHEMA}")
        return "\n".join(lines)

    # -- decisions -------------------------------------------------------------------
    def _blocked_units(self) -> set[str]:
        if self.rollback_cooldown <= 0:
            return set()
        out: set[str] = set()
        for e in list(self.memory)[-self.rollback_cooldown:]:
            if e.rolled_back:
                out.update(e.units)
        return out

    def _fallback(self, table: list[dict], max_sparsity: float) -> list[str]:
        units = zscore_greedy(table, max_sparsity, self.max_units_per_step, self._blocked_units())
        if not units:
            units = zscore_greedy(table, max_sparsity, self.max_units_per_step)
        return units

    def _repeat_of_rollback(self, units: list[str]) -> bool:
        if not self.memory:
            return False
        last = self.memory[-1]
        return last.rolled_back and set(last.units) == set(units)

    def candidate_moves(self, table: list[dict], max_sparsity: float) -> list[tuple[list[str], str]]:
        """A handful of valid moves for candidate scoring: (units, rationale)."""
        k = self.max_units_per_step
        elig = [r for r in table if float(r["sparsity"]) < max_sparsity - _EPS]
        if not elig:
            return []
        z = {str(r["unit"]): float(r["z_wanda"]) + float(r["z_grad"]) for r in elig}
        pos = {str(r["unit"]): _row_index(r, i) for i, r in enumerate(table)}
        by = lambda key: [str(r["unit"]) for r in sorted(elig, key=lambda r: (key(r), pos[str(r["unit"])]))]
        combined = by(lambda r: z[str(r["unit"])])
        blocked = self._blocked_units()
        share = {str(r["unit"]): float(r.get("param_share", 0.0)) for r in elig}
        out: list[tuple[list[str], str]] = []

        def add(units: list[str], why: str) -> None:
            if units and all(set(units) != set(u) for u, _ in out):
                out.append((units, why))

        add(combined[:k], f"the {min(k, len(combined))} units with the lowest combined importance z_sum")
        if blocked:
            add([u for u in combined if u not in blocked][:k],
                "lowest combined importance, avoiding units of recently rolled-back moves")
        add(combined[:2], "the two least important units")
        for u in combined[:3]:
            add([u], f"{u} alone: one of the least important units, a cautious step")
        add(by(lambda r: float(r["z_wanda"]))[:k], "the lowest Wanda weight-activation scores")
        add(by(lambda r: float(r["z_grad"]))[:k], "the lowest gradient importance")
        pool = combined[: 2 * k]
        add(sorted(pool, key=lambda u: (-share[u], pos[u]))[:k],
            "low-importance units with the largest parameter share, for faster progress")
        return [(u, w) for u, w in out if not self._repeat_of_rollback(u)] or out

    def _ask(self, messages: list[dict], schema: str) -> tuple[str, dict]:
        meta: dict[str, Any] = {}
        rl = getattr(self.backend, "request_log", None)
        n0 = len(rl) if isinstance(rl, list) else None
        t0 = time.perf_counter()
        try:
            raw = self.backend.complete(messages, schema_hint=schema)
        finally:
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            if n0 is not None and len(rl) > n0:
                meta["backend_attempts"] = rl[-1].get("attempts")
                meta["backend_errors"] = rl[-1].get("errors")
        return raw, meta

    def decide(self, table: list[dict], *, iteration: int, global_sparsity: float, target: float,
               max_sparsity: float, increment: float) -> dict:
        """One decision. Returns a record with ``units``, ``rationale``, ``source``, ``attempts``..."""
        system = self.system_prompt(increment, max_sparsity)
        user = self.user_prompt(table, iteration=iteration, global_sparsity=global_sparsity,
                                target=target, max_sparsity=max_sparsity, increment=increment)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        rec: dict[str, Any] = {"mode": self.mode, "attempts": []}

        if self.use_candidates:
            cands = self.candidate_moves(table, max_sparsity)
            if not cands:
                return {**rec, "units": [], "rationale": "", "source": "none",
                        "note": "no unit is below the cap"}
            texts = [json.dumps({"units": u, "rationale": w}) for u, w in cands]
            t0 = time.perf_counter()
            try:
                best = int(self.backend.choose(messages, texts))
            except LLMBackendError as exc:
                if self.on_backend_error == "raise":
                    rec["attempts"].append({"prompt": messages, "candidates": texts, "error": str(exc)})
                    rec["backend_error"] = str(exc)
                    raise _DecisionError(rec) from exc
                best = -1
                rec["backend_error"] = str(exc)
            attempt = {"prompt": messages, "candidates": texts, "chosen": best,
                       "scores": getattr(self.backend, "last_scores", None),
                       "seconds": round(time.perf_counter() - t0, 3),
                       "note": "candidate scoring: the model picked the most likely of these valid moves"}
            rec["attempts"].append(attempt)
            if 0 <= best < len(texts):
                parsed = parse_move(texts[best], table, max_sparsity=max_sparsity,
                                    max_units=self.max_units_per_step)
                if parsed.ok:
                    attempt["parsed"] = asdict(parsed)
                    return {**rec, "units": parsed.units, "rationale": parsed.rationale,
                            "source": "candidate-scoring", "repairs": []}
                attempt["error"] = parsed.error
            else:
                attempt["error"] = f"choose() returned {best!r}"
            self.fallbacks += 1
            units = self._fallback(table, max_sparsity)
            log.warning("candidate scoring failed (%s); fell back to zscore-greedy", attempt.get("error"))
            return {**rec, "units": units, "rationale": "zscore-greedy fallback",
                    "source": "fallback:zscore-greedy", "fallback_reason": attempt.get("error")}

        invalid = 0
        while invalid < self.max_invalid:
            try:
                raw, meta = self._ask(messages, MOVE_SCHEMA)
            except LLMBackendError as exc:
                rec["attempts"].append({"prompt": list(messages), "error": str(exc), "backend_error": True})
                rec["backend_error"] = str(exc)
                if self.on_backend_error == "raise":
                    raise _DecisionError(rec) from exc
                break
            attempt = {"prompt": list(messages), "raw": raw, **meta}
            rec["attempts"].append(attempt)
            parsed = parse_move(raw, table, max_sparsity=max_sparsity, max_units=self.max_units_per_step)
            attempt["parsed"] = asdict(parsed)
            error = parsed.error
            if error is None and self._repeat_of_rollback(parsed.units):
                error = ("this exact move was rolled back in the previous step and the model is unchanged, "
                         "so it would be rolled back again; choose different or fewer units")
            if error is None:
                if parsed.repairs:
                    self.repaired_answers += 1
                    attempt["repairs"] = parsed.repairs
                return {**rec, "units": parsed.units, "rationale": parsed.rationale,
                        "source": "llm-repaired" if parsed.repairs else "llm", "repairs": parsed.repairs}
            invalid += 1
            self.invalid_answers += 1
            attempt["error"] = error
            log.info("invalid LLM answer (%d/%d): %s", invalid, self.max_invalid, error)
            if invalid < self.max_invalid:
                messages = messages + [
                    {"role": "assistant", "content": raw},
                    {"role": "user", "content": (
                        f"Your answer was invalid: {error}. Reply again with ONLY one JSON object of the "
                        f"form {MOVE_SCHEMA}, using 1 to {self.max_units_per_step} unit names from the "
                        "profile table that are not at the CAP.")},
                ]
        self.fallbacks += 1
        units = self._fallback(table, max_sparsity)
        reason = rec.get("backend_error") or f"{invalid} invalid answer(s)"
        log.warning("LLM agent fell back to zscore-greedy (%s): %s", reason, units)
        return {**rec, "units": units, "rationale": "zscore-greedy fallback",
                "source": "fallback:zscore-greedy", "fallback_reason": reason}

    # -- episode ---------------------------------------------------------------------
    def run(self, env, seed: int | None = None) -> dict:
        """Play one IterativePrune episode; returns a summary dict (JSON-serialisable)."""
        self.memory.clear()
        self.n_moves = 0
        self._reset_counters()
        u = env.unwrapped
        names = [str(n) for n in u.unit_names]
        position = {n: i for i, n in enumerate(names)}
        seed = self.seed if seed is None else seed
        _, info = env.reset(seed=seed)
        info = dict(info or {})
        cur_ppl, cur_acc = _f(info.get("ppl")), _f(info.get("fact_acc"))
        self._transcript.write({
            "event": "start", "task": "iterative", "time": time.time(), "llm_model": self.llm_model,
            "backend": type(self.backend).__name__, "mode": self.mode, "seed": seed,
            "agent": {"max_units_per_step": self.max_units_per_step, "max_invalid": self.max_invalid,
                      "memory_size": self.memory_size, "rollback_cooldown": self.rollback_cooldown},
            "env": {"n_units": len(names), "target_sparsity": u.target_sparsity,
                    "max_sparsity": u.max_sparsity, "increment": u.increment},
            "reset_info": info,
        })
        terminated = truncated = False
        iteration = 0
        total_reward = 0.0
        own_rollbacks = 0
        stopped = None
        last_info = info
        dtype = getattr(env.action_space, "dtype", None) or np.int8
        while not (terminated or truncated):
            if self.max_iterations is not None and iteration >= self.max_iterations:
                stopped = f"max_iterations={self.max_iterations} reached"
                break
            iteration += 1
            table = list(u.profile_table())
            g_before = float(u.global_sparsity)
            try:
                dec = self.decide(table, iteration=iteration, global_sparsity=g_before,
                                  target=float(u.target_sparsity), max_sparsity=float(u.max_sparsity),
                                  increment=float(u.increment))
            except _DecisionError as exc:
                self._transcript.write({"event": "error", "iteration": iteration, **exc.record})
                raise exc.__cause__ from None
            if not dec["units"]:
                stopped = "no unit is below the per-unit cap"
                self._transcript.write({"event": "stop", "iteration": iteration, "reason": stopped, **dec})
                break
            action = np.zeros(len(names), dtype=dtype)
            for name in dec["units"]:
                action[position[name]] = 1
            _, reward, terminated, truncated, info = env.step(action)
            info = dict(info or {})
            last_info = info
            total_reward += float(reward)
            rolled = bool(info.get("rolled_back", False))
            own_rollbacks += int(rolled)
            ppl_after, acc_after = _f(info.get("ppl")), _f(info.get("fact_acc"))
            entry = MemoryEntry(
                iteration=iteration, units=list(dec["units"]), source=dec["source"],
                rationale=dec.get("rationale", ""), rolled_back=rolled,
                ppl_before=cur_ppl, ppl_after=ppl_after, ppl_increase=_f(info.get("ppl_increase")),
                fact_acc_before=cur_acc, fact_acc_after=acc_after,
                sparsity_before=g_before, sparsity_after=float(u.global_sparsity), reward=float(reward),
            )
            self.memory.append(entry)
            self.n_moves += 1
            if not rolled:
                cur_ppl = ppl_after if ppl_after is not None else cur_ppl
                cur_acc = acc_after if acc_after is not None else cur_acc
            self._transcript.write({
                "event": "step", "iteration": iteration, **dec,
                "action": [i for i, a in enumerate(action) if a],
                "outcome": {"reward": reward, "terminated": terminated, "truncated": truncated, "info": info},
                "memory_entry": asdict(entry), "memory_text": entry.describe(),
            })
        summary = {
            "agent": self.name,
            "llm_model": self.llm_model,
            "backend": type(self.backend).__name__,
            "mode": self.mode,
            "seed": seed,
            "iterations": iteration,
            "rollbacks": int(last_info.get("rollbacks", own_rollbacks)),
            "fallbacks": self.fallbacks,
            "invalid_answers": self.invalid_answers,
            "repaired_answers": self.repaired_answers,
            "total_reward": total_reward,
            "terminated": bool(terminated),
            "truncated": bool(truncated),
            "stopped": stopped,
            "achieved_sparsity": _f(last_info.get("achieved_sparsity", getattr(u, "global_sparsity", None))),
            "final_info": _jsonable(last_info),
            "transcript": str(self.transcript_path) if self.transcript_path else None,
        }
        self._transcript.write({"event": "end", "summary": summary})
        return summary

    # -- LayerPrune-v0 ------------------------------------------------------------------
    def allocation_messages(self, table: list[dict], target: float) -> list[dict]:
        system = (
            "You are a pruning agent. You choose a per-unit sparsity ratio (fraction of weights zeroed by "
            "unstructured Wanda-style pruning) for every unit of a language model, in one shot.\n"
            "Goal: the parameter-weighted mean sparsity must equal the target while perplexity and "
            "factual knowledge suffer as little as possible. Give more sparsity to units with low z_sum "
            "(z_wanda + z_grad: z-scored Wanda weight-activation and gradient importance; low = less "
            f"important) and less to sensitive units. Ratios must lie in [0, {ALLOC_MAX_RATIO}]; the "
            "environment rescales them to match the budget exactly.\n"
            "Reply with ONLY one JSON object, no other text, exactly of this form:\n"
            f"{ALLOCATION_SCHEMA}"
        )
        user = (
            f"Target mean sparsity: {target:.2%} (weighted by share).\n\nSensitivity profile:\n"
            f"{format_profile_table(table, math.inf)}\n\n"
            f"Give a ratio for every unit. Answer with the JSON object only: {ALLOCATION_SCHEMA}"
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _zscore_allocation(self, table: list[dict], numel: list[float], target: float,
                           strength: float = 0.5) -> list[float]:
        z = np.array([float(r["z_wanda"]) + float(r["z_grad"]) for r in table])
        sd = float(z.std()) or 1.0
        spread = strength * min(target, ALLOC_MAX_RATIO - target, 0.25)
        return budget_match((target - spread * z / sd).tolist(), numel, target)

    def allocate(self, profile_table: list[dict], numel, target: float) -> list[float]:
        """One full allocation for LayerPrune-v0, ordered by the table's ``index``.

        ``numel``: per-unit parameter counts, a list by index or a dict by unit name. The result
        is clipped to [0, 0.95] and budget-matched (numel-weighted mean == target).
        """
        table = sorted(profile_table, key=lambda r: _row_index(r, 0))
        names = [str(r["unit"]) for r in table]
        if isinstance(numel, dict):
            n = [float(numel[nm]) for nm in names]
        else:
            n = [float(numel[_row_index(r, i)]) for i, r in enumerate(table)]
        target = float(target)
        messages = self.allocation_messages(table, target)
        rec: dict[str, Any] = {"event": "allocate", "time": time.time(), "llm_model": self.llm_model,
                               "backend": type(self.backend).__name__, "mode": self.mode,
                               "target": target, "attempts": []}
        ratios: list[float] | None = None
        rationale, source = "", None
        try:
            if self.use_candidates:
                cands = [("uniform", [target] * len(names), "uniform sparsity for every unit")]
                for s, w in ((0.25, "mildly"), (0.5, "moderately"), (1.0, "strongly")):
                    cands.append((f"zscore-{s}", self._zscore_allocation(table, n, target, s),
                                  f"{w} more sparsity for low-importance units"))
                texts = [json.dumps({"ratios": {nm: round(v, 3) for nm, v in zip(names, r)}, "rationale": w})
                         for _, r, w in cands]
                best = int(self.backend.choose(messages, texts))
                rec["attempts"].append({"prompt": messages, "candidates": [c[0] for c in cands], "chosen": best,
                                        "scores": getattr(self.backend, "last_scores", None),
                                        "note": "candidate scoring over valid allocations"})
                if 0 <= best < len(cands):
                    ratios, rationale, source = list(cands[best][1]), cands[best][2], "candidate-scoring"
            else:
                invalid = 0
                while invalid < self.max_invalid:
                    raw, meta = self._ask(messages, ALLOCATION_SCHEMA)
                    vals, why, repairs, err = parse_allocation(raw, table, fill=target)
                    attempt = {"prompt": list(messages), "raw": raw, **meta, "repairs": repairs, "error": err}
                    rec["attempts"].append(attempt)
                    if err is None:
                        ratios, rationale = vals, why
                        source = "llm-repaired" if repairs else "llm"
                        break
                    invalid += 1
                    self.invalid_answers += 1
                    if invalid < self.max_invalid:
                        messages = messages + [
                            {"role": "assistant", "content": raw},
                            {"role": "user", "content": f"Your answer was invalid: {err}. Reply again with "
                                                        f"ONLY one JSON object of the form {ALLOCATION_SCHEMA}."},
                        ]
        except LLMBackendError as exc:
            rec["backend_error"] = str(exc)
            if self.on_backend_error == "raise":
                self._transcript.write(rec)
                raise
        if ratios is None:
            self.fallbacks += 1
            ratios, rationale, source = self._zscore_allocation(table, n, target), "zscore fallback", \
                "fallback:zscore"
            log.warning("LLM allocation fell back to the z-score allocation")
        matched = budget_match(ratios, n, target)
        rec.update({"source": source, "rationale": rationale, "raw_ratios": ratios, "ratios": matched,
                    "units": names})
        self._transcript.write(rec)
        return matched


class _DecisionError(Exception):
    def __init__(self, record: dict):
        super().__init__("decision failed")
        self.record = record
