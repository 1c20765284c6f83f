"""One-shot pruning CLI: prune a model, evaluate dense and pruned, save metrics, model and masks.

    python -m prune_env.cli --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50

Every input is checked before the model loads, and --out is proved writable and locked for the whole
run (a second run on the same folder is refused at once). The results are written into a hidden
staging folder inside --out and moved into place at the end, so an error never leaves a half-written
result and never touches what another run wrote. Data defaults are `prune_env.context.DataConfig`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from .context import DataConfig, PruningContext
from .data.corpus import load_text
from .data.facts import load_facts
from .files import LOCK_NAME, STAGING_PREFIX, OutputLockedError, atomic_write_json, output_lock, staged_files
from .models import read_header
from .pruning.allocation_files import load_allocation
from .pruning.export import save_pruned
from .pruning.masking import parse_pattern
from .pruning.methods import method_names
from .validation import check_device, check_number, check_ratio

DEFAULT_SPARSITY = 0.5
_DATA = DataConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prune_env.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or hub id")
    parser.add_argument("--method", default="wanda", choices=method_names())
    parser.add_argument("--sparsity", type=float, default=None,
                        help=f"uniform ratio in [0, 1) (default {DEFAULT_SPARSITY}); not with --pattern")
    parser.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8: it fixes "
                        "the sparsity at N/M in every layer, so it takes no --sparsity or --allocation")
    parser.add_argument("--allocation", default=None, help="JSON: ratios per block, per linear, or {name: ratio}")
    parser.add_argument("--eval-text", default=_DATA.text, help="text source: debian-handbook, FILE.txt, "
                        "wikitext2, c4")
    parser.add_argument("--facts", default=_DATA.facts, help="facts source: offline, FILE.jsonl, freebaseqa")
    parser.add_argument("--eval-tokens", type=int, default=_DATA.eval_tokens)
    parser.add_argument("--n-facts", type=int, default=_DATA.n_facts, help="how many facts (>= 0); 0 = all of them")
    parser.add_argument("--calib-samples", type=int, default=_DATA.calib_samples)
    parser.add_argument("--calib-seq-len", type=int, default=_DATA.calib_seq_len)
    parser.add_argument("--seed", type=int, default=_DATA.seed)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (CUDA when present)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-save-model", action="store_true", help="write metrics and masks only")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Everything checkable without the model, before any work: bad input fails in a second."""
    nm = parse_pattern(args.pattern)
    if nm is not None and (args.sparsity is not None or args.allocation):
        given = "--sparsity" if args.sparsity is not None else "--allocation"
        raise ValueError(f"--pattern {args.pattern} fixes the sparsity at {nm[0]}/{nm[1]} in every layer, so "
                         f"{given} cannot apply: drop {given}, or drop --pattern for unstructured pruning")
    if args.sparsity is not None:
        check_ratio("--sparsity", args.sparsity)
    check_number("--eval-tokens", args.eval_tokens, low=_DATA.eval_seq_len, integer=True)  # one window at least
    check_number("--n-facts", args.n_facts, low=0, integer=True)
    check_number("--calib-samples", args.calib_samples, low=1, integer=True)
    check_number("--calib-seq-len", args.calib_seq_len, low=1, integer=True)
    check_number("--seed", args.seed, low=0, integer=True)
    args.device = check_device(args.device)
    if args.allocation:
        _check_json_file("--allocation", Path(args.allocation))
    for flag, value in (("--eval-text", args.eval_text), ("--facts", args.facts)):
        looks_like_file = value.endswith((".txt", ".jsonl", ".json")) or "/" in value
        if looks_like_file and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} file {value!r} does not exist")
    if Path(args.eval_text).is_file():  # a damaged file of the user's fails here, not after the model has loaded
        load_text(args.eval_text)
    if Path(args.facts).is_file():
        load_facts(args.facts)
    out = Path(args.out)
    if not (out / LOCK_NAME).exists():  # with a lock file, `run` tells a live run from a dead one's leftovers
        _refuse_results_in(out)


def _check_json_file(flag: str, path: Path) -> None:
    """The file exists and is UTF-8 JSON: its contents are checked against the model once that has loaded."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} file {str(path)!r} does not exist")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"{flag} file {str(path)!r} is not UTF-8 JSON ({error})") from None


def _refuse_results_in(out: Path) -> None:
    """--out must be new or empty; a run's lock file and the staging folder of a killed run count as empty."""
    if out.exists() and (not out.is_dir() or any(not _is_run_leftover(p) for p in out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} already exists and is not empty: choose a new folder")


def _is_run_leftover(path: Path) -> bool:
    return path.name == LOCK_NAME or (path.name.startswith(STAGING_PREFIX) and path.is_dir())


def _target(args: argparse.Namespace) -> float | None:
    """The sparsity the run aims at, as metrics.json records it (None for a free-form allocation)."""
    nm = parse_pattern(args.pattern)
    if nm is not None:
        return nm[0] / nm[1]
    if args.allocation:
        return None
    return DEFAULT_SPARSITY if args.sparsity is None else args.sparsity


def _prune_and_measure(args: argparse.Namespace) -> tuple[PruningContext, dict]:
    data = DataConfig(text=args.eval_text, facts=args.facts, eval_tokens=args.eval_tokens, n_facts=args.n_facts,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
                      grad_samples=0)
    started = time.time()
    target = _target(args)
    refs = list(read_header(args.model).refs)  # from the config: a wrong allocation fails before the weights load
    ratios = load_allocation(args.allocation, refs) if args.allocation else {ref.name: target for ref in refs}
    ctx = PruningContext(args.model, device=args.device, dtype=args.dtype, method=args.method,
                         pattern=args.pattern, data=data, granularity="linear")
    unit_ratios = [ratios.get(unit.name, 0.0) for unit in ctx.units]
    dense_seconds = time.time() - started
    t0 = time.time()
    result = ctx.prune(unit_ratios, progress=True)
    prune_seconds = time.time() - t0
    t0 = time.time()
    pruned = ctx.evaluate()
    metrics = {
        "model": args.model, "method": args.method, "pattern": args.pattern, "target_sparsity": target,
        "achieved_sparsity": result.achieved_sparsity,
        "dense": ctx.dense.as_dict(), "pruned": pruned.as_dict(),
        "per_layer_sparsity": result.per_layer(),
        "seconds": {"setup_and_dense": dense_seconds, "prune": prune_seconds, "eval_pruned": time.time() - t0},
        "data": ctx.describe(), "device": args.device, "dtype": args.dtype,
    }
    return ctx, metrics


def _write_results(ctx: PruningContext, metrics: dict, out: Path, save_model: bool) -> None:
    """Write into a hidden folder inside `out`, then move each file into place, metrics.json last."""
    with staged_files(out, last="metrics.json") as staging:
        save_pruned(ctx, staging, save_model=save_model)
        atomic_write_json(staging / "metrics.json", metrics)


def run(args: argparse.Namespace) -> dict:
    _validate(args)
    out = Path(args.out)
    existed = out.exists()
    with output_lock(out, "--out"):  # proves --out writable; a second run on it fails here, at once
        try:
            _refuse_results_in(out)  # again under the lock: a run that finished meanwhile keeps its files
            for leftover in out.glob(STAGING_PREFIX + "*"):  # a killed run's partial files: nobody holds them
                shutil.rmtree(leftover)
            ctx, metrics = _prune_and_measure(args)
            _write_results(ctx, metrics, out, save_model=not args.no_save_model)
        finally:  # leave no lock file, and no folder this run created but wrote nothing to
            (out / LOCK_NAME).unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):  # not empty: results, or a newer run's lock
                    out.rmdir()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = run(args)
    except (ValueError, OSError, OutputLockedError) as error:
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
