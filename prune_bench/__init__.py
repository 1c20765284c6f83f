"""The benchmark behind `benchmark.py`: agents x target sparsities x seeds on one model, one operator,
one calibration set and one held-out evaluation set.

Modules, one concern each:
    bench_config  BenchmarkConfig (typed, range-checked) and `load_benchmark_config`
    heldout     the held-out text windows and facts, derived from the env's reward slices
    runner      Runner: one PruningContext and the agents, built once per process; runs one cell
    store       results.json: records, schema validation, resume, atomic writes
    executors   SerialBackend (this process) and RayBackend (Ray actors)
    intervals   paired bootstrap intervals of every agent against uniform
    report      report.md and the plots
    driver      run_benchmark: the grid, under the output folder's lock
"""
