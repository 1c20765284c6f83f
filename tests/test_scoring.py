"""Sensitivity profile: gradient importance reduced on the fly equals the direct per-sample computation."""

from __future__ import annotations

import pytest
import torch

from prune_env.pruning.calibration import TokenBatch
from prune_env.models import linear_layers
from prune_env.pruning.scoring import _gradient_means
from prune_env.tiny import tiny_model


def test_gradient_means_equal_per_sample_autograd_and_leave_no_gradients():
    model, _ = tiny_model("llama", seed=5)
    refs = linear_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = dict.fromkeys((ref.name for ref in refs), 0.0)
    weights = [ref.module.weight for ref in refs]
    for row in ids:
        loss = model(input_ids=row[None], labels=row[None], use_cache=False).loss
        for ref, grad in zip(refs, torch.autograd.grad(loss, weights)):
            expected[ref.name] += float(grad.abs().float().mean()) / len(ids)
    model.zero_grad(set_to_none=True)
    embed = model.get_input_embeddings().weight
    embed.requires_grad_(False)  # a frozen parameter stays frozen

    got = _gradient_means(model, refs, [TokenBatch(ids[:2]), TokenBatch(ids[2:])])

    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert abs(got[name] - value) <= 1e-6 * abs(value) + 1e-12, name
    assert len(set(got.values())) == len(got)  # one value per linear, not a shared one
    assert all(p.grad is None for p in model.parameters())
    assert not embed.requires_grad and weights[0].requires_grad


def test_gradient_means_leave_the_callers_gradients_in_place():
    model, _ = tiny_model("llama", seed=5)
    refs = linear_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}

    _gradient_means(model, refs, [TokenBatch(ids)])

    assert all(torch.equal(p.grad, before[name]) for name, p in model.named_parameters())


def test_corrupt_caches_are_rebuilt_with_a_warning(tmp_path, monkeypatch, text_file):
    """A damaged profile or dense-metric cache file is named, deleted and rebuilt, never a blocker."""
    from prune_env.context import PruningContext
    from prune_env.pruning.scoring import cache_dir

    monkeypatch.setenv("PRUNE_GYM_CACHE", str(tmp_path))
    data = {"text": str(text_file), "calib_samples": 2, "calib_seq_len": 32, "eval_tokens": 128,
            "eval_seq_len": 64, "n_facts": 8, "grad_samples": 1}
    first = PruningContext("tiny-llama", data=data)
    caches = sorted(cache_dir().glob("*.pt")) + sorted(cache_dir().glob("dense-*.json"))
    assert len(caches) == 2
    for path in caches:
        path.write_bytes(b"\x00\xff garbage \x80")
    with pytest.warns(RuntimeWarning) as caught:
        second = PruningContext("tiny-llama", data=data)
    named = " ".join(str(w.message) for w in caught)
    assert all(str(path) in named for path in caches)
    assert second.dense.ppl == first.dense.ppl
    assert torch.equal(second.stats.act_norm[first.refs[0].name], first.stats.act_norm[first.refs[0].name])
    assert all(path.exists() for path in caches)  # rebuilt
