"""The agents that play prune-gym: each turns a pruning context and a target sparsity into an allocation.

    base          Agent (the one interface), the agent registry and build_agent
    rules         pure allocation rules: budget matching, uniform, OWL, z-score greedy, random
    heuristics    the rule-based agents (uniform, owl, zscore, ...) built on the rules
    alphapruning  AlphaPruning (heavy-tailed layer statistics)
    search        the CMA-ES search baseline
    rl            SB3 policies as agents (loaded without unpickling), episode rollouts
    replay        an allocation read from a file, replayed
    llm/          the LLM-prompted agent and its chat backends
"""
