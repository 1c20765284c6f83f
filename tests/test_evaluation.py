"""Perplexity and fact scoring against brute-force computations from model(ids).logits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prune_env.pruning.calibration import advance, record_inputs
from prune_env.data.windows import tokenize_corpus
from prune_env.data.evaluation import (
    FactScores,
    choice_scores,
    evaluate_facts,
    fact_batches,
    nll_from_hidden,
    perplexity,
    retention,
    window_batches,
)
from prune_env.data.facts import Fact
from prune_env.tiny import FAMILIES, tiny_model, tiny_tokenizer

from conftest import FACT_ROWS


@pytest.fixture(scope="module")
def windows(text_file) -> torch.Tensor:
    ids = tokenize_corpus(text_file.read_text(encoding="utf-8"), tiny_tokenizer())
    return ids[1000:1000 + 5 * 40].reshape(5, 40).clone()  # 5 non-overlapping windows


def hand_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None], use_cache=False).logits[0].double()
            logprob = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(logprob.gather(1, row[1:, None]).sum())
            count += row.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_hand_computation(family, windows):
    model, _ = tiny_model(family)
    expected = hand_perplexity(model, windows)
    for batch_size in (1, 2, 4):  # 5 windows: ragged last batch
        assert perplexity(model, windows, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_perplexity_from_replayed_hidden_states(windows):
    """The environment's route (block replay, then nll_from_hidden) gives the same perplexity."""
    model, _ = tiny_model("llama")
    batches = window_batches(windows, 2)
    state = advance(model, record_inputs(model, batches))
    total, count = 0.0, 0
    for batch, hidden in zip(batches, state.hidden):
        nll, n = nll_from_hidden(model, batch, hidden)
        total, count = total + nll, count + n
    assert count == windows.shape[0] * (windows.shape[1] - 1)
    assert math.exp(total / count) == pytest.approx(hand_perplexity(model, windows), rel=1e-5)


# ----------------------------------------------------------------------------- facts


def brute_force_choice(model, tokenizer, prompt: str, choice: str) -> tuple[float, bool]:
    """Summed log-likelihood of the answer tokens of prompt + " " + choice, and greedy exactness."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + choice)["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids  # the answer starts on a token boundary
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logprob = torch.log_softmax(logits, dim=-1)
    total, greedy = 0.0, True
    for pos in range(len(prompt_ids), len(full)):
        total += float(logprob[pos - 1, full[pos]])
        greedy &= int(logits[pos - 1].argmax()) == full[pos]
    return total, greedy


def brute_force_facts(model, tokenizer, facts: list[Fact]) -> tuple[float, float, list[bool]]:
    correct, nll, exact = 0, 0.0, []
    for fact in facts:
        scored = [brute_force_choice(model, tokenizer, fact.prompt, c) for c in fact.choices]
        best = max(range(len(scored)), key=lambda c: scored[c][0])
        gold = fact.choices.index(fact.answer)
        correct += best == gold
        nll -= scored[gold][0]
        exact.append(scored[gold][1])
    return correct / len(facts), nll / len(facts), exact


def greedy_facts(model, tokenizer, wanted: int, seed: int = 0) -> list[Fact]:
    """Facts whose gold answer is the model's own greedy continuation (so greedy-exact is True)."""
    words = "the capital of France is Paris Spain Madrid gold symbol Au Debian free system package manager".split()
    rng = random.Random(seed)
    found: list[Fact] = []
    for _ in range(400):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        cur = tokenizer(prompt)["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(3):
                token = int(model(input_ids=torch.tensor([cur + generated]), use_cache=False).logits[0, -1].argmax())
                generated.append(token)
                text = tokenizer.decode(generated)
                answer = text[1:]
                if (text.startswith(" ") and answer.strip() == answer and answer
                        and tokenizer(" " + answer, add_special_tokens=False)["input_ids"] == generated):
                    distractors = [w for w in ("Paris", "Au", "system", "Madrid", "gold") if w != answer][:3]
                    choices = (distractors[0], answer, *distractors[1:])
                    found.append(Fact(prompt, answer, choices, "greedy"))
                    break
        if len(found) == wanted:
            return found
    pytest.fail(f"found only {len(found)} greedy facts")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_evaluate_facts_equals_brute_force(family):
    model, tokenizer = tiny_model(family)
    facts = [Fact(p, a, tuple(c), "test") for p, a, c in FACT_ROWS] + greedy_facts(model, tokenizer, 3)
    facts.append(Fact("The capital of Chile is", "Santiago", ("Santiago",), "no-choices"))
    accuracy, nll, exact = brute_force_facts(model, tokenizer, facts)
    assert any(exact) and not all(exact)  # the greedy flags are exercised both ways
    for batch_size in (64, 5):  # one padded batch, or several of different widths
        scores = evaluate_facts(model, tokenizer, facts, batch_size=batch_size)
        assert scores.accuracy == pytest.approx(accuracy, abs=1e-12)
        assert scores.nll == pytest.approx(nll, rel=1e-4)
        assert scores.greedy_exact == exact


def test_fact_batches_unpacked_rows_are_prompt_plus_choice_right_padded():
    tokenizer = tiny_tokenizer()
    facts = [Fact(p, a, tuple(c), "test") for p, a, c in FACT_ROWS[:4]]
    batches = fact_batches(tokenizer, facts, batch_size=5, packed=False)
    assert sum(len(b.spans) for b in batches) == sum(len(f.choices) for f in facts)
    for batch in batches:
        for row, predictors, targets, f_index, c_index in batch.spans:
            fact = facts[f_index]
            full = tokenizer(fact.prompt + " " + fact.choices[c_index])["input_ids"]
            end = targets[-1] + 1
            assert batch.input_ids[row, :end].tolist() == full
            assert targets[0] == len(tokenizer(fact.prompt)["input_ids"])
            assert predictors == [t - 1 for t in targets]
            assert batch.attention_mask[row].tolist() == [1] * end + [0] * (batch.input_ids.shape[1] - end)


def test_fact_batches_packed_rows_hold_prompt_once_and_isolate_choices():
    tokenizer = tiny_tokenizer()
    facts = [Fact(p, a, tuple(c), "test") for p, a, c in FACT_ROWS[:4]]
    batches = fact_batches(tokenizer, facts, batch_size=3, packed=True)
    assert sum(len(b.spans) for b in batches) == sum(len(f.choices) for f in facts)
    for batch in batches:
        mask = batch.attention_mask[:, 0]
        for row, predictors, targets, f_index, c_index in batch.spans:
            fact = facts[f_index]
            prompt = tokenizer(fact.prompt)["input_ids"]
            answer = tokenizer(" " + fact.choices[c_index], add_special_tokens=False)["input_ids"]
            assert batch.input_ids[row, :len(prompt)].tolist() == prompt
            assert batch.input_ids[row, targets].tolist() == answer
            # positions continue the prompt, as if the choice followed it directly
            assert batch.position_ids[row, targets].tolist() == list(range(len(prompt), len(prompt) + len(answer)))
            assert predictors[0] == len(prompt) - 1
            # a choice token sees the whole prompt and its own earlier tokens, nothing of other choices
            visible = mask[row, targets[-1]].nonzero().flatten().tolist()
            assert visible == list(range(len(prompt))) + targets


def test_choice_scores_from_replayed_hidden_states():
    model, tokenizer = tiny_model("qwen3")
    facts = [Fact(p, a, tuple(c), "test") for p, a, c in FACT_ROWS]
    for batch in fact_batches(tokenizer, facts, batch_size=16):
        direct = choice_scores(model, batch)
        state = advance(model, record_inputs(model, [batch]))
        replayed = choice_scores(model, batch, state.hidden[0])
        assert direct.greedy == replayed.greedy
        for key, value in direct.loglik.items():
            assert replayed.loglik[key] == pytest.approx(value, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- retention


def test_retention_hand_check():
    dense = [True, True, False, True, False, True]
    pruned = [True, False, True, True, False, False]
    # the dense model knows facts 0, 1, 3, 5; the pruned one still knows 0 and 3
    assert retention(dense, pruned) == pytest.approx(2 / 4)
    assert retention(dense, dense) == 1.0
    assert retention(dense, [False] * 6) == 0.0
    assert math.isnan(retention([False, False], [True, True]))  # nothing known to lose
    with pytest.raises(ValueError):
        retention([True], [True, False])


def test_fact_scores_as_dict():
    scores = FactScores(accuracy=0.5, nll=1.25, greedy_exact=[True, False, False, True])
    assert scores.as_dict() == {"fact_acc": 0.5, "fact_nll": 1.25, "fact_greedy_exact": 0.5}
