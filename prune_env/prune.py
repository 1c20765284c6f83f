"""One-shot pruning CLI: prune a model, evaluate dense and pruned, save metrics, model and masks.

    python -m prune_env.prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50

Everything is written to a temporary folder beside --out and renamed at the end, so an error never
leaves a half-written result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .allocation import load_allocation
from .context import DataConfig, PruningContext
from .export import save_pruned
from .files import staged_directory
from .masking import METHODS, check_ratio, parse_pattern


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prune_env.prune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or hub id")
    parser.add_argument("--method", default="wanda", choices=METHODS)
    parser.add_argument("--sparsity", type=float, default=0.5, help="uniform ratio in [0, 1)")
    parser.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    parser.add_argument("--allocation", default=None, help="JSON: ratios per block, per linear, or {name: ratio}")
    parser.add_argument("--eval-text", default="debian-handbook", help="text source: debian-handbook, FILE.txt, "
                        "wikitext2, c4")
    parser.add_argument("--facts", default="offline", help="facts source: offline, FILE.jsonl, freebaseqa")
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--n-facts", type=int, default=0, help="0 = all facts")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-save-model", action="store_true", help="write metrics and masks only")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Everything checkable without the model, before any work: bad input fails in a second."""
    check_ratio(args.sparsity)
    parse_pattern(args.pattern)
    if args.allocation and not Path(args.allocation).is_file():
        raise FileNotFoundError(f"--allocation file {args.allocation!r} does not exist")
    for flag, value in (("--eval-text", args.eval_text), ("--facts", args.facts)):
        looks_like_file = value.endswith((".txt", ".jsonl", ".json")) or "/" in value
        if looks_like_file and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} file {value!r} does not exist")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {args.out!r} already exists and is not empty: choose a new folder")


def run(args: argparse.Namespace) -> dict:
    _validate(args)
    data = DataConfig(text=args.eval_text, facts=args.facts, eval_tokens=args.eval_tokens, n_facts=args.n_facts,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
                      grad_samples=0)
    started = time.time()
    ctx = PruningContext(args.model, device=args.device, dtype=args.dtype, method=args.method,
                         pattern=args.pattern, data=data, granularity="linear")
    ratios = (load_allocation(args.allocation, ctx.refs) if args.allocation
              else {ref.name: args.sparsity for ref in ctx.refs})
    unit_ratios = [ratios.get(unit.name, 0.0) for unit in ctx.units]
    dense_seconds = time.time() - started
    t0 = time.time()
    result = ctx.prune(unit_ratios, progress=True)
    prune_seconds = time.time() - t0
    t0 = time.time()
    pruned = ctx.evaluate()
    metrics = {
        "model": args.model, "method": args.method, "pattern": args.pattern,
        "target_sparsity": None if args.allocation else args.sparsity,
        "achieved_sparsity": result.achieved_sparsity,
        "dense": ctx.dense.as_dict(), "pruned": pruned.as_dict(),
        "per_layer_sparsity": result.per_layer(),
        "seconds": {"setup_and_dense": dense_seconds, "prune": prune_seconds, "eval_pruned": time.time() - t0},
        "data": ctx.describe(), "device": args.device, "dtype": args.dtype,
    }
    try:
        with staged_directory(args.out) as staging:  # validated above: --out is new or empty
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
            save_pruned(ctx, staging, save_model=not args.no_save_model)
    finally:
        ctx.restore()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    d, p = metrics["dense"], metrics["pruned"]
    print(f"dense   ppl {d['ppl']:.2f}  fact_acc {d['fact_acc']:.3f}")
    print(f"pruned  ppl {p['ppl']:.2f}  fact_acc {p['fact_acc']:.3f}  retention {p['fact_retention']:.3f}  "
          f"sparsity {metrics['achieved_sparsity']:.4f}")
    print(f"wrote {args.out}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
