"""results.json: the records of a benchmark, their schema, resume, and atomic writes.

results.json (schema_version 1; checked by `validate_results`)
--------------------------------------------------------------
Top level:
    schema_version  1
    model           model spec (str)
    operator        {"method", "pattern", "granularity"}
    data            ctx.describe() of the benchmark context (text source, calibration starts, evaluation
                    region, facts source / n / offset, units, device, dtype)
    env_data        the env DataConfig (dict) the held-out regions were derived from, with `reward_slices`
    dense           dense metrics on the held-out data {ppl, fact_acc, fact_nll, fact_retention}
    dense_per_fact  {"greedy_exact": [bool], "relation": [str], "answer": [str]} per held-out fact (intervals;
                    absent in old files, relation/answer optional: the balanced retention interval)
    knowledge_baseline  optional: what always answering each relation's most frequent dense-known answer
                    scores (prune_env.data.knowledge.MajorityBaseline.as_dict)
    units           [{"name", "numel"}] in allocation order
    machine         {platform, python, cpu_count, torch, transformers, device, cuda_device, backend}
    config          the full benchmark config
    created, updated  ISO timestamps
    exports         [{cell, dir, ppl, ppl_reloaded, ok}] (may be empty)
    records         one per agent x target x seed:
        agent             label (str)
        agent_config      the agent's config dict
        seed              int
        target_sparsity   float in (0, 1)
        achieved_sparsity float (zeros / prunable weights after the prune) or null
        ppl, fact_acc, fact_nll, fact_retention   floats (null when failed)
        fact_retention_balanced, fact_acc_balanced, retention_by_relation  optional (absent in old records):
                          answer-balanced floats in [0, 1] and {relation: float} (prune_env/data/knowledge.py)
        fact_answer_ppl_balanced  optional: the answer-balanced answer perplexity, a number > 0
        per_window        {"nll": [summed NLL], "tokens": [count]} per held-out window, or null (failed,
                          or absent in records written before intervals existed)
        per_fact          {"correct": [bool], "greedy_exact": [bool], "answer_nll": [float] (optional: the right
                          answer's NLL per token)} per held-out fact, or null / absent
        allocation        per-unit ratios (list of floats, len == len(units)) or null
        seconds           wall seconds of the cell (0 for reused records)
        timings           {"allocate", "prune", "evaluate"} seconds
        status            "ok" | "failed"
        error             null when ok, else "ExceptionType: message"; `traceback` holds the stack
        llm_model, iterations, rollbacks   LLM agent only (else null); `llm` holds more LLM details
                          (`moves`, `fallback_moves`, `all_fallback`: true when every move was the
                          zscore-greedy fallback, so the cell measures the fallback, not the LLM),
                          `rl` the policy, algo, training model and env fidelity of RL agents,
                          `search` the optimiser, episodes used and best/uniform quality of search agents
        reused_from_seed  int or null
Secrets (values of keys such as api_key, password, authorization, *_api_key) are written as "***"
everywhere in the file, so an API key given in a config never reaches results.json.
results.json is rewritten atomically after every cell. `--resume` keeps the ok records of an existing
results.json made with the same model, operator and data (else it refuses) and runs the missing and the
failed cells. Without `--resume` an existing results.json is never overwritten.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_env.files import atomic_write_json, safe_name, to_jsonable
from prune_env.validation import is_finite_number, is_int

SCHEMA_VERSION = 1
METRICS = ("ppl", "fact_acc", "fact_nll", "fact_retention")
BALANCED = ("fact_retention_balanced", "fact_acc_balanced")  # optional: older records lack them
ANSWER_PPL = "fact_answer_ppl_balanced"  # optional, > 0: older records lack it
REDACTED = "***"
_SECRET_KEY = re.compile(r"(^|_)(api_?key|password|secret|authorization|access_token|auth_token|bearer_token)$",
                         re.IGNORECASE)


class ResultsError(ValueError):
    """A results.json that does not follow the schema, or cannot be resumed."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cell_key(agent: str, target: float, seed: int) -> tuple[str, float, int]:
    return (str(agent), round(float(target), 9), int(seed))


def cell_name(agent: str, target: float, seed: int) -> str:
    return f"{safe_name(agent)}-t{float(target):g}-s{int(seed)}"


def redact_secrets(value: Any) -> Any:
    """A copy of `value` whose secret-named keys (api_key, OPENAI_API_KEY, password, ...) hold "***"
    (None stays None: "no key" is not a secret). Applied to every config and record before it is stored."""
    if isinstance(value, dict):
        return {k: (REDACTED if v is not None and _SECRET_KEY.search(str(k)) else redact_secrets(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return value


def new_record(agent: str, agent_config: dict, target: float, seed: int) -> dict:
    return {"agent": agent, "agent_config": agent_config, "seed": int(seed), "target_sparsity": float(target),
            "achieved_sparsity": None, "ppl": None, "fact_acc": None, "fact_nll": None, "fact_retention": None,
            "fact_retention_balanced": None, "fact_acc_balanced": None, "fact_answer_ppl_balanced": None,
            "retention_by_relation": None,
            "per_window": None, "per_fact": None, "allocation": None, "seconds": 0.0, "timings": {},
            "status": "failed", "error": None, "llm_model": None, "iterations": None, "rollbacks": None,
            "reused_from_seed": None}


def validate_results(data: Any) -> None:
    """Raise ResultsError listing every violation of the results.json schema (module docstring)."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ResultsError(f"results must be a JSON object, got {type(data).__name__}")
    top = {"schema_version": is_int, "model": lambda v: isinstance(v, str),
           "operator": lambda v: isinstance(v, dict), "data": lambda v: isinstance(v, dict),
           "machine": lambda v: isinstance(v, dict), "records": lambda v: isinstance(v, list)}
    for key, ok in top.items():
        if key not in data:
            errors.append(f"missing top-level field {key!r}")
        elif not ok(data[key]):
            errors.append(f"top-level field {key!r} has the wrong type ({type(data[key]).__name__})")
    if data.get("schema_version") not in (None, SCHEMA_VERSION) and is_int(data.get("schema_version")):
        errors.append(f"schema_version {data['schema_version']} is not supported (expected {SCHEMA_VERSION})")
    if isinstance(data.get("operator"), dict):
        missing = {"method", "pattern", "granularity"} - set(data["operator"])
        if missing:
            errors.append(f"operator lacks {sorted(missing)}")
    if isinstance(data.get("machine"), dict):
        missing = {"platform", "cpu_count", "torch", "transformers", "device"} - set(data["machine"])
        if missing:
            errors.append(f"machine lacks {sorted(missing)}")
    sizes = _sizes(data)
    dense = data.get("dense_per_fact")
    if dense is not None:
        errors.extend(_flags_errors("dense_per_fact", dense, ("greedy_exact",), sizes["facts"]))
        errors.extend(_labels_errors(dense, sizes["facts"]))
    if data.get("knowledge_baseline") is not None and not isinstance(data["knowledge_baseline"], dict):
        errors.append("top-level field 'knowledge_baseline' must be an object")
    seen: dict[tuple, int] = {}
    for i, rec in enumerate(data.get("records") if isinstance(data.get("records"), list) else []):
        errors.extend(_record_errors(i, rec, sizes, seen))
    if errors:
        shown = errors[:25] + ([f"... and {len(errors) - 25} more"] if len(errors) > 25 else [])
        raise ResultsError("invalid results:\n  - " + "\n  - ".join(shown))


def _sizes(data: dict) -> dict[str, int | None]:
    """Units, held-out windows and facts of the file (None where the header does not say)."""
    described = data.get("data") if isinstance(data.get("data"), dict) else {}
    windows = ((described.get("text") or {}).get("evaluation") or {}).get("windows")
    facts = (described.get("facts") or {}).get("n")
    return {"units": len(data["units"]) if isinstance(data.get("units"), list) else None,
            "windows": windows if is_int(windows) else None, "facts": facts if is_int(facts) else None}


def _per_fact_errors(where: str, value: dict, keys: tuple[str, ...], n: int | None, kind: type, wanted: str
                     ) -> list[str]:
    """Each of `keys` in `value` is a list of `kind`, one entry per held-out fact."""
    errors = []
    for key in keys:
        items = value.get(key)
        if not isinstance(items, list) or not all(isinstance(x, kind) for x in items):
            errors.append(f"{where}.{key} must be {wanted}")
        elif n is not None and len(items) != n:
            errors.append(f"{where}.{key} has {len(items)} entries but there are {n} held-out facts")
    return errors


def _flags_errors(where: str, value: Any, keys: tuple[str, ...], n: int | None) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} must be an object with {list(keys)}"]
    return _per_fact_errors(where, value, keys, n, bool, "a list of true/false")


def _labels_errors(dense: Any, n: int | None) -> list[str]:
    """The optional per-fact relation and answer names of dense_per_fact (both or neither)."""
    if not isinstance(dense, dict) or ("relation" not in dense and "answer" not in dense):
        return []
    return _per_fact_errors("dense_per_fact", dense, ("relation", "answer"), n, str,
                            "a list of strings (one per held-out fact)")


def _balanced_errors(where: str, rec: dict) -> list[str]:
    """The optional answer-balanced metrics: numbers in [0, 1] when ok, else null; absent in old records."""
    errors = []
    ok = rec["status"] == "ok"
    for key in BALANCED:
        value = rec.get(key)
        if key in rec and (value is not None or ok) and not (is_finite_number(value) and 0.0 <= value <= 1.0):
            errors.append(f"{where}: {key!r} must be a number in [0, 1]{'' if ok else ' or null'}, got {value!r}")
    value = rec.get(ANSWER_PPL)
    if value is not None and not (is_finite_number(value) and value > 0.0):
        errors.append(f"{where}: {ANSWER_PPL!r} must be a positive number or null, got {value!r}")
    by_relation = rec.get("retention_by_relation")
    if by_relation is not None and not (isinstance(by_relation, dict) and all(
            isinstance(k, str) and is_finite_number(v) and 0.0 <= v <= 1.0 for k, v in by_relation.items())):
        errors.append(f"{where}: 'retention_by_relation' must map relation names to numbers in [0, 1] or be null")
    return errors


def _per_window_errors(where: str, value: Any, n: int | None) -> list[str]:
    if not isinstance(value, dict) or not isinstance(value.get("nll"), list) or not isinstance(value.get("tokens"), list):
        return [f"{where}: 'per_window' must be an object with lists 'nll' and 'tokens'"]
    nll, tokens = value["nll"], value["tokens"]
    errors = []
    if not all(is_finite_number(x) and x >= 0 for x in nll):
        errors.append(f"{where}: 'per_window.nll' must be non-negative finite numbers")
    if not all(is_int(x) and x > 0 for x in tokens):
        errors.append(f"{where}: 'per_window.tokens' must be positive integers")
    if len(nll) != len(tokens) or (n is not None and len(nll) != n):
        errors.append(f"{where}: 'per_window' has {len(nll)} nll and {len(tokens)} token counts for {n} windows")
    return errors


def _record_errors(i: int, rec: Any, sizes: dict, seen: dict) -> list[str]:
    if not isinstance(rec, dict):
        return [f"records[{i}] must be an object, got {type(rec).__name__}"]
    where = f"records[{i}] (agent={rec.get('agent')!r}, target={rec.get('target_sparsity')!r}, seed={rec.get('seed')!r})"
    required = ("agent", "seed", "target_sparsity", "achieved_sparsity", *METRICS, "allocation", "seconds",
                "status", "error", "llm_model", "iterations", "rollbacks")
    errors = [f"{where}: missing field {key!r}" for key in required if key not in rec]
    if errors:
        return errors
    if not isinstance(rec["agent"], str) or not rec["agent"]:
        errors.append(f"{where}: 'agent' must be a non-empty string")
    if not is_int(rec["seed"]) or rec["seed"] < 0:
        errors.append(f"{where}: 'seed' must be a non-negative integer, got {rec['seed']!r}")
    if not is_finite_number(rec["target_sparsity"]) or not 0.0 < rec["target_sparsity"] < 1.0:
        errors.append(f"{where}: 'target_sparsity' must be a number in (0, 1), got {rec['target_sparsity']!r}")
    if not is_finite_number(rec["seconds"]) or rec["seconds"] < 0:
        errors.append(f"{where}: 'seconds' must be a non-negative number, got {rec['seconds']!r}")
    if rec["status"] not in ("ok", "failed"):
        errors.append(f"{where}: 'status' must be 'ok' or 'failed', got {rec['status']!r}")
    if rec["llm_model"] is not None and not isinstance(rec["llm_model"], str):
        errors.append(f"{where}: 'llm_model' must be a string or null, got {rec['llm_model']!r}")
    for key in ("iterations", "rollbacks"):
        if rec[key] is not None and (not is_int(rec[key]) or rec[key] < 0):
            errors.append(f"{where}: {key!r} must be a non-negative integer or null, got {rec[key]!r}")
    alloc = rec["allocation"]
    if alloc is not None:
        if not isinstance(alloc, list) or not all(is_finite_number(x) and 0.0 <= x < 1.0 for x in alloc):
            errors.append(f"{where}: 'allocation' must be a list of ratios in [0, 1) or null")
        elif sizes["units"] is not None and len(alloc) != sizes["units"]:
            errors.append(f"{where}: 'allocation' has {len(alloc)} ratios but there are {sizes['units']} units")
    if rec.get("per_window") is not None:
        errors.extend(_per_window_errors(where, rec["per_window"], sizes["windows"]))
    if rec.get("per_fact") is not None:
        errors.extend(_flags_errors(f"{where}: per_fact", rec["per_fact"], ("correct", "greedy_exact"),
                                    sizes["facts"]))
        if isinstance(rec["per_fact"], dict) and "answer_nll" in rec["per_fact"]:
            errors.extend(_per_fact_errors(f"{where}: per_fact", rec["per_fact"], ("answer_nll",), sizes["facts"],
                                           float, "a list of numbers (NLL per answer token)"))
    if rec.get("llm") is not None:
        errors.extend(_llm_errors(where, rec["llm"]))
    errors.extend(_balanced_errors(where, rec))
    if rec["status"] == "ok":
        if rec["error"] is not None:
            errors.append(f"{where}: an ok record must have error null, got {rec['error']!r}")
        for key in METRICS:
            if not is_finite_number(rec[key]):
                errors.append(f"{where}: ok record needs a finite number {key!r}, got {rec[key]!r}")
        if is_finite_number(rec["ppl"]) and rec["ppl"] <= 0:
            errors.append(f"{where}: 'ppl' must be positive, got {rec['ppl']!r}")
        for key in ("fact_acc", "fact_retention"):
            if is_finite_number(rec[key]) and not 0.0 <= rec[key] <= 1.0:
                errors.append(f"{where}: {key!r} must be in [0, 1], got {rec[key]!r}")
        if not is_finite_number(rec["achieved_sparsity"]) or not 0.0 <= rec["achieved_sparsity"] <= 1.0:
            errors.append(f"{where}: ok record needs 'achieved_sparsity' in [0, 1], got {rec['achieved_sparsity']!r}")
        if alloc is None:
            errors.append(f"{where}: ok record needs an 'allocation'")
    elif rec["status"] == "failed":
        if not isinstance(rec["error"], str) or not rec["error"].strip():
            errors.append(f"{where}: a failed record needs a non-empty 'error' string, got {rec['error']!r}")
        for key in METRICS:
            if rec[key] is not None and not is_finite_number(rec[key]):
                errors.append(f"{where}: {key!r} must be a number or null, got {rec[key]!r}")
    if not errors:
        key = cell_key(rec["agent"], rec["target_sparsity"], rec["seed"])
        if key in seen:
            errors.append(f"{where}: duplicate of records[{seen[key]}] (same agent, target, seed)")
        seen[key] = i
    return errors


def _llm_errors(where: str, llm: Any) -> list[str]:
    """The move counts of an LLM record (absent in records written before they existed)."""
    if not isinstance(llm, dict):
        return [f"{where}: 'llm' must be an object or null"]
    counts = ("moves", "fallback_moves", "all_fallback")
    if not any(key in llm for key in counts):
        return []
    if not all(key in llm for key in counts):
        return [f"{where}: 'llm' must hold all of {list(counts)} or none"]
    moves, fallback, flag = llm["moves"], llm["fallback_moves"], llm["all_fallback"]
    if not (is_int(moves) and is_int(fallback) and 0 <= fallback <= moves):
        return [f"{where}: 'llm.moves' and 'llm.fallback_moves' must be integers with 0 <= fallback_moves <= moves, "
                f"got {moves!r} and {fallback!r}"]
    if flag is not (moves > 0 and fallback == moves):
        return [f"{where}: 'llm.all_fallback' is {flag!r} but {fallback} of {moves} moves fell back"]
    return []


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error}") from None
    try:
        validate_results(data)
    except ResultsError as error:
        raise ResultsError(f"{path}: {error}") from None
    return data


def write_results(path: str | Path, data: dict) -> None:
    """Validate, then write atomically (a reader sees the old or the new file, never a mix), secrets
    redacted."""
    validate_results(data)
    atomic_write_json(path, redact_secrets(data), indent=1)


_COMPARED = ("model", "operator", "units")


def check_resumable(old: dict, header: dict, path: Path) -> None:
    """Refuse to mix records of a different model, operator, units or data (the device may differ)."""
    diffs = [k for k in _COMPARED if old.get(k) != header.get(k)]
    strip = lambda d: {k: v for k, v in (d or {}).items() if k != "device"}  # noqa: E731
    if strip(old.get("data")) != strip(header.get("data")):
        diffs.append("data")
    if diffs:
        raise ResultsError(f"cannot resume {path}: it was made with a different {', '.join(diffs)}; "
                           "use a new --out folder or the original config")


@dataclass
class Cell:
    agent: str
    target: float
    seed: int
    reuse_from: int | None = None  # seed of the record this deterministic cell copies

    @property
    def key(self) -> tuple[str, float, int]:
        return cell_key(self.agent, self.target, self.seed)


def plan_cells(labels: list[str], targets: list[float], seeds: list[int], deterministic: dict[str, bool],
               reuse: bool = True) -> list[Cell]:
    cells = []
    for agent in labels:
        for target in targets:
            for k, seed in enumerate(seeds):
                reuse_from = seeds[0] if reuse and deterministic[agent] and k > 0 else None
                cells.append(Cell(agent, float(target), int(seed), reuse_from))
    return cells


class Store:
    """results.json in memory: records keyed by cell, rewritten atomically on every change."""

    def __init__(self, path: Path, header: dict, config: dict, plan: list[Cell], previous: dict | None = None,
                 agent_configs: dict[str, dict] | None = None):
        self.path, self.plan = path, plan
        self.agent_configs = redact_secrets(to_jsonable(agent_configs or {}))
        self.data = {**header, "config": redact_secrets(to_jsonable(config)), "created": now(), "updated": now(),
                     "exports": [], "records": []}
        self.records: dict[tuple, dict] = {}
        if previous is not None:
            self.data["created"] = previous.get("created", self.data["created"])
            self.data["exports"] = list(previous.get("exports") or [])
            for rec in previous["records"]:  # a file written before redaction may hold a key: not kept
                self.records[cell_key(rec["agent"], rec["target_sparsity"], rec["seed"])] = redact_secrets(rec)

    def done(self, cell: Cell) -> bool:
        """An ok record made with the agent's current config (a changed config is recomputed)."""
        rec = self.records.get(cell.key)
        if rec is None or rec["status"] != "ok":
            return False
        return rec.get("agent_config") == self.agent_configs.get(cell.agent, rec.get("agent_config"))

    def todo(self) -> list[Cell]:
        """The cells to compute: not copies of another seed, and without an ok record."""
        return [cell for cell in self.plan if cell.reuse_from is None and not self.done(cell)]

    def get(self, agent: str, target: float, seed: int) -> dict | None:
        return self.records.get(cell_key(agent, target, seed))

    def add(self, record: dict) -> None:
        record = redact_secrets(record)
        self.records[cell_key(record["agent"], record["target_sparsity"], record["seed"])] = record
        self.fill_copies()
        self.write()

    def set_export(self, entry: dict) -> None:
        self.data["exports"] = [e for e in self.data["exports"] if e.get("cell") != entry["cell"]]
        self.data["exports"].append(to_jsonable(entry))
        self.write()

    def fill_copies(self) -> None:
        for cell in self.plan:
            if cell.reuse_from is None or self.done(cell):
                continue
            source = self.get(cell.agent, cell.target, cell.reuse_from)
            if source is not None and source.get("reused_from_seed") is None:
                self.records[cell.key] = {**copy.deepcopy(source), "seed": cell.seed, "seconds": 0.0, "timings": {},
                                          "reused_from_seed": cell.reuse_from}

    def write(self) -> None:
        order = {cell.key: i for i, cell in enumerate(self.plan)}
        keys = sorted(self.records, key=lambda k: order.get(k, len(order)))
        self.data["records"] = [self.records[k] for k in keys]
        self.data["updated"] = now()
        write_results(self.path, self.data)
