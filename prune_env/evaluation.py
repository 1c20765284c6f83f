"""Quality measurements: perplexity (WikiText-2 protocol) and factual QA (multiple choice + retention).

Both are split in two stages, token batches -> final hidden states -> scores, so that the environment
can produce the final hidden states block by block (hidden-state caching) and score them here.
Logits are only ever formed for the positions a score needs, in chunks, never for a whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import TokenBatch, final_hidden
from .facts import Fact

HEAD_CHUNK = 1024


@dataclass
class FactScores:
    accuracy: float
    nll: float
    greedy_exact: list[bool]

    def as_dict(self) -> dict:
        return {"fact_acc": self.accuracy, "fact_nll": self.nll,
                "fact_greedy_exact": sum(self.greedy_exact) / max(len(self.greedy_exact), 1)}


@dataclass
class FactBatch(TokenBatch):
    """prompt+choice sequences; spans[i] = (row, first answer position, end, fact index, choice index)."""

    spans: list[tuple[int, int, int, int, int]] | None = None


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def token_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of `targets` given final hidden states at the preceding positions (flat), in chunks."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = [F.cross_entropy(_logits(model, hidden[i:i + HEAD_CHUNK]), targets[i:i + HEAD_CHUNK], reduction="none")
           for i in range(0, hidden.shape[0], HEAD_CHUNK)]
    return torch.cat(out) if out else hidden.new_zeros(0)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[TokenBatch]:
    return [TokenBatch(windows[i:i + batch_size]) for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def nll_from_hidden(model: nn.Module, batch: TokenBatch, last_hidden: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and token count of next-token prediction over one batch of windows."""
    hidden = final_hidden(model, batch, last_hidden)
    nll = token_nll(model, hidden[:, :-1], batch.input_ids[:, 1:].to(hidden.device))
    return float(nll.double().sum()), nll.numel()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over non-overlapping windows, as Wanda/SparseGPT evaluate WikiText-2."""
    base = model.base_model
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in window_batches(windows.to(device), batch_size):
        hidden = base(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        nll = token_nll(model, hidden[:, :-1], batch.input_ids[:, 1:])
        total, count = total + float(nll.double().sum()), count + nll.numel()
    return math.exp(total / count)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def fact_batches(tokenizer, facts: list[Fact], batch_size: int = 64) -> list[FactBatch]:
    """All prompt+choice sequences, sorted by length and right padded, in batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = []
    for f_index, fact in enumerate(facts):
        prompt = _encode(tokenizer, fact.prompt, special=True)
        for c_index, choice in enumerate(fact.choices):
            answer = _encode(tokenizer, " " + choice, special=False)
            sequences.append((prompt + answer, len(prompt), f_index, c_index))
    sequences.sort(key=lambda s: (len(s[0]), s[2], s[3]))
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s[0]) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        spans = []
        for row, (seq, p_len, f_index, c_index) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            spans.append((row, p_len, len(seq), f_index, c_index))
        batches.append(FactBatch(ids, mask, spans))
    return batches


@dataclass
class ChoiceScores:
    """Per (fact, choice): summed answer log-likelihood and whether every answer token is the argmax."""

    loglik: dict[tuple[int, int], float]
    greedy: dict[tuple[int, int], bool]

    def merge(self, other: "ChoiceScores") -> None:
        self.loglik.update(other.loglik)
        self.greedy.update(other.greedy)


@torch.no_grad()
def choice_scores(model: nn.Module, batch: FactBatch, last_hidden: torch.Tensor | None = None) -> ChoiceScores:
    """Score the answer tokens of one fact batch from its final hidden states."""
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if last_hidden is None:
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        hidden = final_hidden(model, TokenBatch(ids, mask), last_hidden)
    rows, positions = [], []
    for row, start, end, _, _ in batch.spans:
        rows += [row] * (end - start)
        positions += list(range(start - 1, end - 1))
    rows_t, pos_t = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
    logits = torch.cat([_logits(model, hidden[rows_t[i:i + HEAD_CHUNK], pos_t[i:i + HEAD_CHUNK]])
                        for i in range(0, len(rows), HEAD_CHUNK)])
    targets = ids[rows_t, pos_t + 1]
    logprob = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    is_max = logits.argmax(-1) == targets
    scores, offset = ChoiceScores({}, {}), 0
    for row, start, end, f_index, c_index in batch.spans:
        n = end - start
        scores.loglik[(f_index, c_index)] = float(logprob[offset:offset + n].double().sum())
        scores.greedy[(f_index, c_index)] = bool(is_max[offset:offset + n].all())
        offset += n
    return scores


def summarise_facts(facts: list[Fact], scores: ChoiceScores) -> FactScores:
    """MC accuracy by summed log-likelihood, mean NLL of the correct answer, greedy-exact flags."""
    correct, nll, exact = 0, 0.0, []
    for f_index, fact in enumerate(facts):
        gold = fact.choices.index(fact.answer)
        lls = [scores.loglik[(f_index, c)] for c in range(len(fact.choices))]
        correct += int(max(range(len(lls)), key=lambda c: (lls[c], -c)) == gold)
        nll -= lls[gold]
        exact.append(scores.greedy[(f_index, gold)])
    n = max(len(facts), 1)
    return FactScores(accuracy=correct / n, nll=nll / n, greedy_exact=exact)


@torch.no_grad()
def evaluate_facts(model: nn.Module, tokenizer, facts: list[Fact], batch_size: int = 64) -> FactScores:
    scores = ChoiceScores({}, {})
    for batch in fact_batches(tokenizer, facts, batch_size):
        scores.merge(choice_scores(model, batch))
    return summarise_facts(facts, scores)


def retention(dense_exact: list[bool], pruned_exact: list[bool]) -> float:
    """Share of the facts the dense model answers greedy-exact that the pruned model still does."""
    known = [p for d, p in zip(dense_exact, pruned_exact, strict=True) if d]
    return sum(known) / len(known) if known else float("nan")
