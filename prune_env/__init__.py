"""prune-gym: Gymnasium environments in which an agent prunes a real LLM layer by layer.

Importing the package registers the environments; `gym.make("prune_env:prune_env/LayerPrune-v0")` imports
it on its own.

`reward_threshold` of LayerPrune is uniform Wanda's exact return at the default target 0.5 on the
default reward slices of SmolLM2-135M: about -1.0 (README, "Training" section: "uniform Wanda there:
ppl about 50, reward about -1.0"), so a policy above it beats the uniform baseline. LayerPrune always
terminates after one step per unit (the unit count depends on the model and granularity), so it needs
no `max_episode_steps`. IterativePrune registers its default `max_steps` (100) as `max_episode_steps`
and no reward threshold: its masks are ranked on dense statistics (no recalibration) and its return
subtracts rollback penalties, so LayerPrune's uniform number does not carry over and none was measured.
"""

from gymnasium.envs.registration import register

UNIFORM_WANDA_RETURN = -1.0

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
