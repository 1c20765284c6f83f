"""Benchmark allocation agents on one model, one operator, the same calibration and held-out evaluation.

    python benchmark.py --config configs/benchmark.yaml [key=value ...] [--eval-text FILE] [--facts FILE]
                        [--out DIR] [--resume] [--export AGENT:TARGET:SEED ...] [--report-only]
    python benchmark.py --check-export DIR/export/<cell>

A grid of agents x target sparsities x seeds. In each cell the agent produces an allocation (one ratio
per unit, parameter-weighted sparsity == target), the allocation is applied with `ctx.prune` (the exact
sequential calibrated prune, from the dense model) and the pruned model is measured on the held-out
data (prune_bench.heldout). Seeds only change the agents; deterministic agents are computed once per
target and copied to the other seeds (`reused_from_seed`; off with `reuse_deterministic=false`).
report.md gives mean ± std over seeds and paired bootstrap intervals against uniform.

Outputs in --out: results.json (schema in prune_bench.store), report.md, allocation_t<target>.png,
ppl_vs_sparsity.png, facts_vs_sparsity.png, transcripts/ (LLM agents), export/<cell>/ for exported cells.
The folder is locked for the whole run: a second run on it fails at once. The work lives in the
`prune_bench` package; this file is its command line. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prune_bench.bench_config import DEFAULT_CONFIG, load_benchmark_config
from prune_bench.driver import report_only, run_benchmark
from prune_bench.runner import check_export
from prune_env.files import OutputLockedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmark.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default configs/benchmark.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. targets=[0.5] backend=ray")
    parser.add_argument("--eval-text", default=None, help="text source for calibration and evaluation (data.text)")
    parser.add_argument("--facts", default=None, help="facts source: offline, FILE.jsonl, freebaseqa (data.facts)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's out)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted results.json in --out")
    parser.add_argument("--export", action="append", default=[], metavar="AGENT:TARGET:SEED",
                        help="save this cell's pruned model and masks into OUT/export/<cell> and check it")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and plots from results.json")
    parser.add_argument("--check-export", default=None, metavar="DIR", help="reload an exported cell, check its ppl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.check_export:
            result = check_export(args.check_export)
            print(json.dumps(result, indent=2))
            return 0 if result["ok"] else 1
        config = load_benchmark_config(args.config, args.overrides, eval_text=args.eval_text, facts=args.facts,
                                       out=args.out, export=args.export)
        if args.report_only:
            print(f"wrote {report_only(config)}")
            return 0
        data = run_benchmark(config, resume=args.resume)
    except KeyboardInterrupt:
        print("interrupted: finished cells are in results.json; rerun with --resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, OutputLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sum(r["status"] == "failed" for r in data["records"])
    out = Path(config.out)
    print(f"{len(data['records'])} records ({failed} failed) in {out / 'results.json'}; report {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
