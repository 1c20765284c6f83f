"""prune-gym: Gymnasium environments in which an agent prunes a real LLM layer by layer."""

from gymnasium.envs.registration import register

register(id="prune_env/LayerPrune-v0", entry_point="prune_env.env:LayerPruneEnv")
register(id="prune_env/IterativePrune-v0", entry_point="prune_env.iterative_env:IterativePruneEnv")

__all__ = ["register"]
__version__ = "0.1.0"
