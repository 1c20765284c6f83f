"""prune-gym: Gymnasium environments in which an agent prunes a real LLM layer by layer.

Importing the package registers the environments; `gym.make("prune_env:prune_env/LayerPrune-v0")` imports
it on its own.

`reward_threshold` of LayerPrune is uniform Wanda's exact return at the default target 0.5 on the
default reward slices of SmolLM2-135M, -1.028 (prune_env/reference_scores.json, the reference table;
tests/test_reference.py keeps the two equal), so a policy above it beats uniform there. It holds for
that target only: at other targets, or with `target_sparsity_range`, compare
`prune_env.reference.normalised_score(task, target, return)` (0 = uniform, 1 = best known) instead.
LayerPrune always terminates after one step per unit, so it needs no `max_episode_steps`.
IterativePrune registers its default `max_steps` (100) as `max_episode_steps` and no reward threshold
(the reference table does not cover it). IterativePrune-v2 pays for an unmet target; v0/v1 keep
their published reward (`unmet_penalty=0`).
"""

from gymnasium.envs.registration import register

UNIFORM_WANDA_RETURN = -1.028  # the reference table's exact uniform return at 0.5

register(id="prune_env/LayerPrune-v0", entry_point="prune_env.env:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN)
register(id="prune_env/LayerPrune-v1", entry_point="prune_env.env:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN, kwargs={"kind_encoding": "role"})
# v0 and v1 keep their published reward (no unmet-budget penalty: never pruning wins them); v2 pays for it
register(id="prune_env/IterativePrune-v0", entry_point="prune_env.iterative_env:IterativePruneEnv",
         max_episode_steps=100, kwargs={"unmet_penalty": 0.0})
register(id="prune_env/IterativePrune-v1", entry_point="prune_env.iterative_env:IterativePruneEnv",
         max_episode_steps=100, kwargs={"bins": 8, "unmet_penalty": 0.0})
register(id="prune_env/IterativePrune-v2", entry_point="prune_env.iterative_env:IterativePruneEnv",
         max_episode_steps=100, kwargs={"bins": 8})

__all__ = ["register"]
__version__ = "0.3.0"  # the one version number (pyproject reads it)
