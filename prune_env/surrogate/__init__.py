"""A fast, faithful stand-in for LayerPrune-v0's exact reward, fitted on exactly evaluated allocations.

    surrogate = load_surrogate(None, context)         # the packaged data set, refused on mismatch
    surrogate.predict(allocation, target_sparsity)    # {"ppl", "fact_acc", "fact_nll", "fact_retention", ...}

    python -m prune_env.surrogate build|merge|fit|check|visited|scores ...   # the data set's commands

dataset.py: the file format (a header naming what it was built from, one record per exact episode; read,
checked, appended, merged). fit.py: the ridge fit, predictions and their spread, the k-fold figures.
serve.py: the fit kept per process and refused for an env it was not built for. commands/: the command
line (`__main__.py`); only these modules import agents (the draws' rules, trained policies), never the
library modules above.
"""

from .dataset import (FLAGS, KNOWLEDGE, MATCH_KEYS, PACKAGED, REBUILD, Dataset, SurrogateDataError,
                      SurrogateMismatchError, append_record, knowledge_of, merge, pack_flags, read_dataset,
                      start_dataset, unpack_flags)
from .fit import (TARGETS, FitConfig, MissingKnowledgeError, Surrogate, SurrogateMetrics, cross_validated, fit,
                  quality_of, reward_spread)
from .serve import check_match, fitted_surrogate, load_surrogate

__all__ = ["FLAGS", "KNOWLEDGE", "MATCH_KEYS", "PACKAGED", "REBUILD", "TARGETS", "Dataset", "FitConfig",
           "MissingKnowledgeError", "Surrogate", "SurrogateDataError", "SurrogateMetrics", "SurrogateMismatchError",
           "append_record", "check_match", "cross_validated", "fit", "fitted_surrogate", "knowledge_of",
           "load_surrogate", "merge", "pack_flags", "quality_of", "read_dataset", "reward_spread", "start_dataset",
           "unpack_flags"]
