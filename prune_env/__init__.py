"""prune-gym: Gymnasium environments in which an agent prunes a real LLM layer by layer.

Importing the package registers the environments; `gym.make("prune_env:prune_env/LayerPrune-v0")` imports
it on its own. The public names below are importable from here (`from prune_env import make_env`); they
load on first use, so `import prune_env` stays cheap (no torch until an env or a context is built).

Folders: `envs/` (the Gymnasium environments, their rewards, fidelities and plug-ins), `pruning/` (masks,
methods, the sequential pruner, calibration, export), `data/` (text, windows, facts, evaluation).
Top level: `models` (loading), `context` (PruningContext, DataConfig), `tiny` (test models),
`validation`, `files`, `config_files` (YAML + overrides), `cli` (`python -m prune_env.cli`).

`reward_threshold` of LayerPrune is uniform Wanda's exact return at the default target 0.5 on the
default reward slices of SmolLM2-135M, -1.028 (prune_env/envs/reference_scores.json, the reference table;
tests/test_reference.py keeps the two equal), so a policy above it beats uniform there. It holds for
that target only: at other targets, or with `target_sparsity_range`, compare
`prune_env.envs.reference.normalised_score(task, target, return)` (0 = uniform, 1 = best known) instead.
LayerPrune always terminates after one step per unit, so it needs no `max_episode_steps`.
IterativePrune registers its default `max_steps` (100) as `max_episode_steps` and no reward threshold
(the reference table does not cover it). IterativePrune-v2 pays for an unmet target; v0/v1 keep
their published reward (`unmet_penalty=0`).
"""

from gymnasium.envs.registration import register

UNIFORM_WANDA_RETURN = -1.028  # the reference table's exact uniform return at 0.5

register(id="prune_env/LayerPrune-v0", entry_point="prune_env.envs.layer:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN)
register(id="prune_env/LayerPrune-v1", entry_point="prune_env.envs.layer:LayerPruneEnv",
         reward_threshold=UNIFORM_WANDA_RETURN, kwargs={"kind_encoding": "role"})
# v0 and v1 keep their published reward (no unmet-budget penalty: never pruning wins them); v2 pays for it
register(id="prune_env/IterativePrune-v0", entry_point="prune_env.envs.iterative:IterativePruneEnv",
         max_episode_steps=100, kwargs={"unmet_penalty": 0.0})
register(id="prune_env/IterativePrune-v1", entry_point="prune_env.envs.iterative:IterativePruneEnv",
         max_episode_steps=100, kwargs={"bins": 8, "unmet_penalty": 0.0})
register(id="prune_env/IterativePrune-v2", entry_point="prune_env.envs.iterative:IterativePruneEnv",
         max_episode_steps=100, kwargs={"bins": 8})

__version__ = "0.3.0"  # the one version number (pyproject reads it)

# public name -> the module that defines it (imported on first access: PEP 562)
_PUBLIC = {
    "make_env": "prune_env.envs.factory",
    "LayerPruneEnv": "prune_env.envs.layer",
    "IterativePruneEnv": "prune_env.envs.iterative",
    "PruningContext": "prune_env.context",
    "DataConfig": "prune_env.context",
    "prune_model": "prune_env.pruning.sequential",
    "register_reward_term": "prune_env.envs.plugins",
    "register_observation_feature": "prune_env.envs.plugins",
    "register_method": "prune_env.pruning.methods",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    """Load a public name's module on first use, so importing the package (gym's entry points) stays cheap."""
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prune_env' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
