"""The surrogate's command modules (`python -m prune_env.surrogate`): the only prune_env modules that import agents."""
