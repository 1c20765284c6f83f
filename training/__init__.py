"""The machinery behind train.py: typed training configs, the SB3 training loop and safe policy loading.

    train_config  TrainConfig, EnvConfig, EvalConfig: every key of a training YAML, typed and checked
    run           the training run: vector envs, callbacks, evaluation, checkpoints, resume
    safe_load     loading a saved policy without unpickling (UnsafeFileError unless trust_pickle=True)
"""
