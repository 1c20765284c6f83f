"""Quality measurements: perplexity (WikiText-2 protocol) and factual QA (multiple choice + retention).

Both are split in two stages, token batches -> final hidden states -> scores, so that the environment
can produce the final hidden states block by block (hidden-state caching) and score them here.
Logits are only ever formed for the positions a score needs, in chunks, never for a whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.calibration import TokenBatch, _base_forward, final_hidden
from .facts import Fact

HEAD_CHUNK_ELEMENTS = 2 ** 24  # logits per chunk (64 MiB in fp32): 341 positions for SmolLM2's 49k vocabulary
# rows x width^2 of one fact batch (its mask, and per head its attention scores): short cloze facts batch as
# asked (64 x 40^2 is 0.1 M); one long fact goes alone instead of asking for gigabytes with 63 short ones.
FACT_BATCH_ELEMENTS = 2 ** 24


@dataclass
class FactScores:
    """Fact metrics, plus per fact whether the multiple choice was right (for paired bootstraps) and the
    right answer's NLL per answer token (the smooth knowledge signal: `knowledge.balanced_answer_ppl`)."""

    accuracy: float
    nll: float
    greedy_exact: list[bool]
    correct: list[bool] = field(default_factory=list)
    answer_nll: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"fact_acc": self.accuracy, "fact_nll": self.nll,
                "fact_greedy_exact": sum(self.greedy_exact) / max(len(self.greedy_exact), 1)}


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_chunk(model: nn.Module) -> int:
    """Positions per LM-head chunk, so that no more than HEAD_CHUNK_ELEMENTS logits exist at once."""
    return max(1, HEAD_CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])


def token_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of `targets` given final hidden states at the preceding positions (flat), in chunks."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = head_chunk(model)
    out = [F.cross_entropy(_logits(model, hidden[i:i + chunk]), targets[i:i + chunk], reduction="none")
           for i in range(0, hidden.shape[0], chunk)]
    return torch.cat(out) if out else hidden.new_zeros(0)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[TokenBatch]:
    return [TokenBatch(windows[i:i + batch_size]) for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def nll_from_hidden(model: nn.Module, batch: TokenBatch, last_hidden: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and token count of next-token prediction over one batch of windows."""
    hidden = final_hidden(model, batch, last_hidden)
    nll = token_nll(model, hidden[:, :-1], batch.input_ids[:, 1:].to(hidden.device))
    return float(nll.double().sum()), nll.numel()


@dataclass
class WindowNLL:
    """Summed NLL and token count per evaluation window: what a paired bootstrap over windows resamples.

    `total` is summed batch by batch exactly as `perplexity` always summed it, so `ppl` is bit-identical.
    """

    nll: list[float]
    tokens: list[int]
    total: float

    @property
    def ppl(self) -> float:
        return math.exp(self.total / sum(self.tokens))


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> WindowNLL:
    """Per-window summed next-token NLL over non-overlapping windows (one forward per batch)."""
    base = model.base_model
    device = next(model.parameters()).device
    per_window: list[float] = []
    tokens: list[int] = []
    total = 0.0
    for batch in window_batches(windows.to(device), batch_size):
        hidden = base(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        nll = token_nll(model, hidden[:, :-1], batch.input_ids[:, 1:])
        total = total + float(nll.double().sum())
        rows = nll.view(batch.input_ids.shape[0], -1)
        per_window += rows.double().sum(1).tolist()
        tokens += [rows.shape[1]] * rows.shape[0]
    return WindowNLL(per_window, tokens, total)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over non-overlapping windows, as Wanda/SparseGPT evaluate WikiText-2."""
    return window_nll(model, windows, batch_size).ppl


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@dataclass
class FactBatch(TokenBatch):
    """Token rows plus, per (fact, choice), where its answer tokens are and where they are predicted from.

    spans[i] = (row, predictor positions, target positions, fact index, choice index).
    """

    spans: list[tuple[int, list[int], list[int], int, int]] | None = None


def supports_packing(model: nn.Module) -> bool:
    """Packed facts need a custom 4D boolean mask, which the SDPA attention path takes as is.

    A custom mask replaces sliding-window masks too, so models with short windows are not packed
    (fact rows are far shorter than 256 tokens).
    """
    window = getattr(model.config, "sliding_window", None)
    return getattr(model.config, "_attn_implementation", None) == "sdpa" and (window is None or window >= 256)


def _pack_row(prompt: list[int], answers: list[list[int]]):
    """One fact per row: the prompt once, then every choice; each choice sees the prompt and itself only."""
    ids, positions, segments = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    spans = []
    for c_index, answer in enumerate(answers, start=1):
        start = len(ids)
        ids += answer
        positions += range(len(prompt), len(prompt) + len(answer))
        segments += [c_index] * len(answer)
        targets = list(range(start, start + len(answer)))
        spans.append(([len(prompt) - 1] + targets[:-1], targets))
    return ids, positions, segments, spans


def fact_batches(tokenizer, facts: list[Fact], batch_size: int = 64, packed: bool = True) -> list[FactBatch]:
    """Fact sequences in right-padded batches.

    packed=True: one row per fact holding the prompt once and all its choices (about 2.3x fewer tokens
    than one row per choice); a 4D mask keeps the choices from seeing each other. packed=False: one row
    per prompt+choice, for attention implementations that cannot take a custom mask.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []  # (ids, positions, segments, spans with fact/choice indices)
    for f_index, fact in enumerate(facts):
        prompt = _encode(tokenizer, fact.prompt, special=True)
        answers = [_encode(tokenizer, " " + choice, special=False) for choice in fact.choices]
        if packed:
            ids, positions, segments, spans = _pack_row(prompt, answers)
            rows.append((ids, positions, segments, [(p, t, f_index, c) for c, (p, t) in enumerate(spans)]))
        else:
            for c_index, answer in enumerate(answers):
                ids = prompt + answer
                targets = list(range(len(prompt), len(ids)))
                rows.append((ids, list(range(len(ids))), [0] * len(ids),
                             [([t - 1 for t in targets], targets, f_index, c_index)]))
    rows.sort(key=lambda r: (len(r[0]), r[3][0][2], r[3][0][3]))
    batches = []
    start = 0
    while start < len(rows):  # rows are sorted by length: the last row of a chunk is its widest
        end = start + 1
        while (end < min(start + batch_size, len(rows))
               and (end + 1 - start) * len(rows[end][0]) ** 2 <= FACT_BATCH_ELEMENTS):
            end += 1
        chunk, start = rows[start:end], end
        width = max(len(r[0]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        segments = torch.full((len(chunk), width), -1, dtype=torch.long)
        spans = []
        for row, (seq, pos, seg, row_spans) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            positions[row, :len(seq)] = torch.tensor(pos)
            segments[row, :len(seq)] = torch.tensor(seg)
            spans += [(row, pred, targets, f_index, c_index) for pred, targets, f_index, c_index in row_spans]
        if packed:
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            seg_q, seg_k = segments[:, :, None], segments[:, None, :]
            mask = causal & ((seg_k == 0) | (seg_q == seg_k)) & (seg_k >= 0)
            mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no empty softmax
            batches.append(FactBatch(ids, mask[:, None], positions, spans))
        else:
            batches.append(FactBatch(ids, (segments >= 0).long(), None, spans))
    return batches


def check_fact_lengths(tokenizer, facts: list[Fact], limit: int | None, model: str, source: str,
                       numbering: list[Fact] | None = None) -> None:
    """Refuse a fact whose prompt and choices (one packed row) exceed the model's context, by its number in
    `numbering` (the source's own order): a 20 KB prompt once asked for a 6.1 GB allocation."""
    if limit is None:
        return
    number = {id(fact): i for i, fact in enumerate(numbering or facts, start=1)}
    for index, fact in enumerate(facts, start=1):
        prompt = _encode(tokenizer, fact.prompt, special=True)
        tokens = len(prompt) + sum(len(_encode(tokenizer, " " + choice, special=False)) for choice in fact.choices)
        if tokens > limit:
            raise ValueError(f"fact {number.get(id(fact), index)} of {source} (prompt {fact.prompt[:40]!r}...) is "
                             f"{tokens} tokens with its {len(fact.choices)} choice(s), more than the context of model "
                             f"{model!r} ({limit} tokens): shorten its prompt and answers, or drop it")


@dataclass
class ChoiceScores:
    """Per (fact, choice): summed answer log-likelihood, whether every answer token is the argmax, and the
    answer's token count."""

    loglik: dict[tuple[int, int], float] = field(default_factory=dict)
    greedy: dict[tuple[int, int], bool] = field(default_factory=dict)
    tokens: dict[tuple[int, int], int] = field(default_factory=dict)

    def merge(self, other: "ChoiceScores") -> None:
        self.loglik.update(other.loglik)
        self.greedy.update(other.greedy)
        self.tokens.update(other.tokens)


@torch.no_grad()
def choice_scores(model: nn.Module, batch: FactBatch, last_hidden: torch.Tensor | None = None) -> ChoiceScores:
    """Score the answer tokens of one fact batch from its final hidden states."""
    device = next(model.parameters()).device
    moved = batch.to(device)
    if last_hidden is None:
        hidden = _base_forward(model, moved).last_hidden_state
    else:
        hidden = final_hidden(model, moved, last_hidden)
    rows, predictors, targets_at = [], [], []
    for row, pred, targets, _, _ in batch.spans:
        rows += [row] * len(targets)
        predictors += pred
        targets_at += targets
    rows_t = torch.tensor(rows, device=device)
    pred_t, target_t = torch.tensor(predictors, device=device), torch.tensor(targets_at, device=device)
    targets = moved.input_ids[rows_t, target_t]
    chunk, logprobs, maxima = head_chunk(model), [], []
    for i in range(0, len(rows), chunk):
        logits = _logits(model, hidden[rows_t[i:i + chunk], pred_t[i:i + chunk]])
        logprobs.append(torch.log_softmax(logits, -1).gather(1, targets[i:i + chunk, None]).squeeze(1))
        maxima.append(logits.argmax(-1) == targets[i:i + chunk])
    logprob, is_max = torch.cat(logprobs), torch.cat(maxima)
    scores, offset = ChoiceScores(), 0
    for _, _, span_targets, f_index, c_index in batch.spans:
        n = len(span_targets)
        scores.loglik[(f_index, c_index)] = float(logprob[offset:offset + n].double().sum())
        scores.greedy[(f_index, c_index)] = bool(is_max[offset:offset + n].all())
        scores.tokens[(f_index, c_index)] = n
        offset += n
    return scores


def summarise_facts(facts: list[Fact], scores: ChoiceScores) -> FactScores:
    """MC accuracy by summed log-likelihood, mean NLL of the correct answer, greedy-exact flags, and the
    correct answer's NLL per token."""
    correct, nll, exact, per_token = [], 0.0, [], []
    for f_index, fact in enumerate(facts):
        gold = fact.choices.index(fact.answer)
        lls = [scores.loglik[(f_index, c)] for c in range(len(fact.choices))]
        correct.append(max(range(len(lls)), key=lambda c: (lls[c], -c)) == gold)
        nll -= lls[gold]
        exact.append(scores.greedy[(f_index, gold)])
        per_token.append(-lls[gold] / scores.tokens[(f_index, gold)])
    n = max(len(facts), 1)
    return FactScores(accuracy=sum(correct) / n, nll=nll / n, greedy_exact=exact, correct=correct,
                      answer_nll=per_token)


@torch.no_grad()
def evaluate_facts(model: nn.Module, tokenizer, facts: list[Fact], batch_size: int = 64) -> FactScores:
    scores = ChoiceScores()
    for batch in fact_batches(tokenizer, facts, batch_size, packed=supports_packing(model)):
        scores.merge(choice_scores(model, batch))
    return summarise_facts(facts, scores)


def retention(dense_exact: list[bool], pruned_exact: list[bool]) -> float:
    """Share of the facts the dense model answers greedy-exact that the pruned model still does."""
    known = [p for d, p in zip(dense_exact, pruned_exact, strict=True) if d]
    return sum(known) / len(known) if known else float("nan")
