"""A knowledge metric that a model cannot game by repeating frequent answers (issue #26).

Why: plain fact retention (`evaluation.retention`, the share of the dense model's greedy-exact facts
that the pruned model still answers) is dominated by a few frequent answers. Of the offline facts, 252
continent facts share 7 answers and Dollar, Euro and Franc cover nearly half of the currency facts, so a
pruned model that drifts toward answering "Africa" or "Dollar" looks knowledgeable.

Answer-balanced retention: the dense-known facts are grouped by (relation, answer); retention is taken
within each answer group, averaged over the answers of a relation (each distinct answer weighs the same,
however many facts share it), then averaged over the relations, each relation weighing the same (a
relation with 250 facts says no more about stored knowledge than one with 50). A model that always gives
one answer keeps one answer group of each relation: it scores 1 / (distinct known answers) per relation,
its majority baseline, instead of that answer's share of the facts.

Majority baseline: what that degenerate model scores, computed exactly by scoring its flags (known and
equal to the relation's most frequent known answer) with the same function, never approximated.

The same balancing applies to multiple-choice accuracy (every fact counts, not only the known ones) and to
the answer perplexity: exp of the balanced mean, over every fact, of the right answer's NLL per answer token.
Greedy-exact and multiple-choice flags are coarse: on SmolLM2-135M at 50-60 % sparsity nearly every known
fact is lost, and which allocation keeps more of them changes with the facts sampled. The answer's
likelihood still moves there, per fact, so the answer perplexity ranks allocations of one budget the same way
on two disjoint halves of the facts far more often (docs/results/knowledge-answer/README.md).
The core works on numpy arrays with per-fact weights, so the benchmark's bootstrap recomputes the balanced
statistic on each resample of facts (resampled counts as weights) with the very code the env reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .evaluation import retention
from .facts import Fact

__all__ = ["BalancedIndex", "MajorityBaseline", "balanced_accuracy", "balanced_answer_ppl", "balanced_retention",
           "knowledge_fields",
           "majority_baseline", "majority_flags"]


@dataclass(frozen=True)
class BalancedIndex:
    """Which (relation, answer) group each fact belongs to, as matrices for the weighted means.

    Built from (relation, answer) labels only, so results.json can rebuild it without the Fact objects.
    """

    relations: tuple[str, ...]  # sorted relation names
    groups: np.ndarray  # (n_facts, n_groups) one-hot membership
    group_relation: np.ndarray  # (n_groups, n_relations) one-hot

    @classmethod
    def of(cls, relations: Sequence[str], answers: Sequence[str]) -> "BalancedIndex":
        if len(relations) != len(answers):
            raise ValueError(f"{len(relations)} relations but {len(answers)} answers: one of each per fact")
        labels = sorted(set(zip(relations, answers)))
        names = tuple(sorted({r for r, _ in labels}))
        column = {label: j for j, label in enumerate(labels)}
        groups = np.zeros((len(relations), len(labels)))
        groups[np.arange(len(relations)), [column[label] for label in zip(relations, answers)]] = 1.0
        group_relation = np.zeros((len(labels), len(names)))
        group_relation[np.arange(len(labels)), [names.index(r) for r, _ in labels]] = 1.0
        return cls(names, groups, group_relation)

    @classmethod
    def of_facts(cls, facts: Sequence[Fact]) -> "BalancedIndex":
        return cls.of([f.relation for f in facts], [f.answer for f in facts])

    def means(self, flags: np.ndarray, within: np.ndarray, weights: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Balanced mean of `flags` over the facts in `within`: (overall, per relation).

        flags (..., n) in {0, 1} (or any per-fact value: the answer NLL); within (n,) the facts that count
        (the dense-known ones for retention);
        weights (R, n) how often each fact is drawn (a bootstrap resample), or None (each fact once).
        Returns overall (..., R) and per relation (..., R, n_relations); without weights the R axis is
        dropped. An answer group with no counted fact is left out of its relation, a relation with
        none is left out of the overall mean; nothing counted at all gives NaN.
        """
        single = weights is None
        w = np.ones((1, self.groups.shape[0])) if single else np.asarray(weights, float)
        w = w * np.asarray(within, float)
        flags = np.asarray(flags, float)
        total = w @ self.groups  # (R, g)
        hits = (flags[..., None, :] * w) @ self.groups  # (..., R, g)
        present = total > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            group_mean = np.where(present, hits / np.where(present, total, 1.0), 0.0)
            answers = present.astype(float) @ self.group_relation  # (R, r): answer groups per relation
            relation_mean = (group_mean @ self.group_relation) / answers
            counted = answers > 0
            overall = np.where(counted, relation_mean, 0.0).sum(-1) / counted.sum(-1)
        if single:
            return overall[..., 0], relation_mean[..., 0, :]
        return overall, relation_mean


def balanced_retention(facts: Sequence[Fact], dense_exact: Sequence[bool], pruned_exact: Sequence[bool]
                       ) -> tuple[float, dict[str, float]]:
    """Answer-balanced retention, overall (relations weigh the same) and per relation (module docstring).

    NaN overall and an empty dict when the dense model answers no fact greedy-exact; relations without a
    known fact are left out of the dict.
    """
    _check_lengths(facts, dense_exact, pruned_exact)
    index = BalancedIndex.of_facts(facts)
    overall, by_relation = index.means(np.asarray(pruned_exact, float), np.asarray(dense_exact, bool))
    return float(overall), {r: float(v) for r, v in zip(index.relations, by_relation) if not np.isnan(v)}


def balanced_accuracy(facts: Sequence[Fact], correct: Sequence[bool]) -> float:
    """Multiple-choice accuracy with each (relation, answer) weighing the same within its relation and each
    relation the same: answering "Africa" to every continent question no longer earns 252 facts' worth."""
    _check_lengths(facts, correct)
    if not facts:
        return float("nan")
    overall, _ = BalancedIndex.of_facts(facts).means(np.asarray(correct, float), np.ones(len(facts), bool))
    return float(overall)


def balanced_answer_ppl(facts: Sequence[Fact], answer_nll: Sequence[float]) -> float:
    """exp of the balanced mean of the right answer's NLL per token: a perplexity on the answers, weighed as
    `balanced_accuracy` weighs facts, lower is better (NaN without facts)."""
    _check_lengths(facts, answer_nll)
    if not facts:
        return float("nan")
    overall, _ = BalancedIndex.of_facts(facts).means(np.asarray(answer_nll, float), np.ones(len(facts), bool))
    return float(np.exp(overall))


def knowledge_fields(facts: Sequence[Fact], dense_exact: Sequence[bool] | None, pruned_exact: Sequence[bool],
                     correct: Sequence[bool], answer_nll: Sequence[float] | None) -> dict:
    """The balanced fields of a model state's `Metrics` (and of a benchmark record), one definition for both.

    dense_exact None means "the dense model itself": its balanced retention is over what it knows (1.0, or
    0.0 when it knows nothing). A pruned model's retention with no dense-known fact reads 0.0, as the plain
    retention does. answer_nll None (a results.json written before it was kept): no answer perplexity."""
    own = dense_exact is None
    balanced, by_relation = balanced_retention(facts, pruned_exact if own else dense_exact, pruned_exact)
    fields = {"fact_retention_balanced": balanced if not np.isnan(balanced) else float(own),
              "fact_acc_balanced": balanced_accuracy(facts, correct) if len(facts) else 0.0}
    if answer_nll is not None:
        fields["fact_answer_ppl_balanced"] = balanced_answer_ppl(facts, answer_nll) if len(facts) else float("nan")
    return {**fields, "retention_by_relation": by_relation}


def _check_lengths(facts: Sequence[Fact], *flags: Sequence) -> None:
    for values in flags:
        if len(values) != len(facts):
            raise ValueError(f"{len(values)} per-fact values for {len(facts)} facts: score the same facts")


def majority_answers(facts: Sequence[Fact], dense_exact: Sequence[bool]) -> dict[str, str]:
    """Each relation's most frequent answer among the dense-known facts (ties: the first in sorted order,
    which changes no baseline value: tied answers have the same count and the same 1 / answers)."""
    _check_lengths(facts, dense_exact)
    counts: dict[str, Counter] = {}
    for fact, known in zip(facts, dense_exact):
        if known:
            counts.setdefault(fact.relation, Counter())[fact.answer] += 1
    return {r: min(c, key=lambda a: (-c[a], a)) for r, c in sorted(counts.items())}


def majority_flags(facts: Sequence[Fact], dense_exact: Sequence[bool]) -> list[bool]:
    """Greedy-exact flags of the degenerate model that always answers its relation's majority answer."""
    major = majority_answers(facts, dense_exact)
    return [major.get(f.relation) == f.answer for f in facts]


@dataclass(frozen=True)
class MajorityBaseline:
    """What always answering a relation's most frequent known answer scores, on the plain and the balanced
    retention, overall and per relation: the floor a retention must clear to show kept knowledge."""

    answers: dict[str, str]
    fact_retention: float
    fact_retention_balanced: float
    retention_by_relation: dict[str, float]  # balanced: 1 / distinct known answers of the relation
    plain_by_relation: dict[str, float]  # majority answer's share of the relation's known facts

    def as_dict(self) -> dict:
        return {"answers": dict(self.answers), "fact_retention": self.fact_retention,
                "fact_retention_balanced": self.fact_retention_balanced,
                "retention_by_relation": dict(self.retention_by_relation),
                "plain_by_relation": dict(self.plain_by_relation)}


def majority_baseline(facts: Sequence[Fact], dense_exact: Sequence[bool]) -> MajorityBaseline:
    """Score `majority_flags` exactly as a pruned model is scored (NaN / empty when nothing is known)."""
    flags = majority_flags(facts, dense_exact)
    balanced, by_relation = balanced_retention(facts, dense_exact, flags)
    plain_by = {}
    for relation in by_relation:
        rows = [i for i, f in enumerate(facts) if f.relation == relation]
        plain_by[relation] = retention([dense_exact[i] for i in rows], [flags[i] for i in rows])
    return MajorityBaseline(majority_answers(facts, dense_exact), retention(dense_exact, flags), balanced,
                            by_relation, plain_by)
