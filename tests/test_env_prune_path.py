"""One prune path: LayerPrune-v0's exact episode and prune_model give identical masks and weights for the
same allocation and calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prune_env.context import PruningContext
from prune_env.envs.layer import LayerPruneEnv
from prune_env.models import weight_matrix


def weights(ctx: PruningContext) -> dict[str, torch.Tensor]:
    return {ref.name: weight_matrix(ref.module).detach().clone() for ref in ctx.refs}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_layer_prune_episode_equals_prune_model(tiny_data, method):
    env = LayerPruneEnv(model="tiny-llama", data=tiny_data, granularity="linear", method=method)
    env.reset(seed=0)
    actions = np.random.default_rng(7).random(len(env.units))
    for value in actions:
        _, _, terminated, _, info = env.step(np.array([value], dtype=np.float32))
    assert terminated
    episode_masks = {name: mask.clone() for name, mask in env.context.masked.masks.items()}
    episode_weights = weights(env.context)
    other = PruningContext("tiny-llama", data=tiny_data, granularity="linear", method=method)
    result = other.prune(info["allocation"])
    assert result.achieved_sparsity == info["achieved_sparsity"]
    for name, expected in weights(other).items():
        assert torch.equal(episode_weights[name], expected), name
        if name in episode_masks:
            assert torch.equal(other.masked.masks[name], episode_masks[name]), name
