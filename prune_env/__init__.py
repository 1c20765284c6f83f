"""prune-gym: Gymnasium environments in which an agent prunes a real LLM layer by layer.

Importing the package registers the environments; `gym.make("prune_env:prune_env/LayerPrune-v0")` imports
it on its own. `reward_threshold` is uniform Wanda's exact return at the default target 0.5 on the
default slices of SmolLM2-135M (README, "Headline" table: about -1.0), so a policy that reaches it
matches the uniform baseline. LayerPrune always terminates after one step per unit (the unit count
depends on the model and granularity), so it has no `max_episode_steps`; IterativePrune's default
`max_steps` (100) is registered as its `max_episode_steps`.
"""

from gymnasium.envs.registration import register

UNIFORM_WANDA_RETURN = -1.0

register(id="prune_env/LayerPrune-v0", entry_point="prune_env.env:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN)
register(id="prune_env/LayerPrune-v1", entry_point="prune_env.env:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN, kwargs={"kind_encoding": "role"})
register(id="prune_env/IterativePrune-v0", entry_point="prune_env.iterative_env:IterativePruneEnv",
         max_episode_steps=100, reward_threshold=UNIFORM_WANDA_RETURN)
register(id="prune_env/IterativePrune-v1", entry_point="prune_env.iterative_env:IterativePruneEnv",
         max_episode_steps=100, reward_threshold=UNIFORM_WANDA_RETURN, kwargs={"bins": 8})

__all__ = ["register"]
__version__ = "0.2.0"
