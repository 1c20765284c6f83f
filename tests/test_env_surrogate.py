"""fidelity="surrogate": the episode touches no weight and runs no forward; its terminal metrics are the
surrogate's prediction for the allocation the env applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prune_env.env import LayerPruneEnv
from prune_env.surrogate import append_record, load_surrogate, start_dataset


def test_surrogate_episode_is_forward_free_and_predicts(tiny_data, tmp_path):
    exact = LayerPruneEnv(model="tiny-llama", data=tiny_data)
    path = tmp_path / "tiny.jsonl"
    start_dataset(path, {"context": exact.context.describe(), "dense": exact.context.dense.as_dict(),
                         "unit_numel": [u.numel for u in exact.units]})
    rng = np.random.default_rng(0)
    for _ in range(6):
        exact.reset(seed=0)
        for value in rng.random(len(exact.units)):
            *_, info = exact.step(np.array([value], dtype=np.float32))
        append_record(path, {key: info[key] for key in ("allocation", "ppl", "fact_acc", "fact_nll",
                                                        "fact_retention")})
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate", surrogate=str(path))
    model = env.context.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    block_handles = [ref.module.register_forward_pre_hook(lambda *args: calls.append(1)) for ref in env.context.refs]
    env.reset(seed=0)
    for value in (0.2, 0.5, 0.8):
        obs, reward, terminated, _, info = env.step(np.array([value], dtype=np.float32))
    handle.remove()
    for h in block_handles:
        h.remove()
    assert terminated and calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(info["achieved_sparsity"] - 0.5) < 1e-3
    predicted = load_surrogate(str(path), env.context).predict(info["allocation"])
    assert info["ppl"] == predicted["ppl"] and info["fact_acc"] == predicted["fact_acc"]
    dense = env.reference
    assert reward == pytest.approx(-np.log(info["ppl"] / dense.ppl) - (dense.fact_acc - info["fact_acc"]))


def test_packaged_surrogate_refuses_another_model(tiny_data):
    with pytest.raises(ValueError, match="was built for"):
        LayerPruneEnv(model="tiny-llama", data=tiny_data, fidelity="surrogate")
