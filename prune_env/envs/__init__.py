"""The Gymnasium environments and what they are made of.

    base        PruneEnvBase: the spaces, observations and reward bookkeeping both envs share
    layer       LayerPruneEnv (LayerPrune-v0/v1): one sparsity per unit, in order, one episode per model
    iterative   IterativePruneEnv (IterativePrune-v0/v1/v2): prune or restore any unit, any number of steps
    factory     make_env: an env with the usual wrappers (rescaled actions, torch threads)
    wrappers    reward wrappers (LinearizeReward scalarises a vector reward)
    rendering   the text render of an episode
    rewards     RewardConfig and the reward terms
    plugins     register_reward_term, register_observation_feature: extension points without an edit here
    reference   the reference scores (reference_scores.json) and normalised_score
    fidelities/ how a LayerPrune episode prunes and measures: exact, proxy, surrogate
"""
