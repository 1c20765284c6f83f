"""Pruning a model: which weights go, how many per unit, and writing the result.

    masking           keep-masks (True = keep), magnitude / Wanda scores, N:M patterns
    methods           the pruning methods by name and register_method
    sequential        prune_model and SequentialPruner: block by block on calibration inputs (SparseGPT order)
    calibration       calibration batches and the recorded block inputs they replay
    snapshot          MaskedModel: masks applied, undone and ranked without copying the model
    scoring           per-unit statistics (Wanda percentile, gradient, z-scores) and their disk cache
    allocation_files  per-unit sparsities read from user files, and the budget wall that bounds each step
    export            save_pruned: the pruned model as a loadable Hugging Face folder
"""
