"""The surrogate's command line: `python -m prune_env.surrogate COMMAND ...` (COMMAND --help for its options).

    build    play exact episodes into a data set (resumable; `make surrogate` rebuilds the packaged one)
    merge    join shards of one build into one data set
    fit      the k-fold figures of a data set's fit (reward, log ppl, fact metrics, balanced knowledge)
    check    read and check every line, fit, and recompute each record's knowledge from its per-fact flags
    visited  surrogate vs exact reward where a trained policy goes; --append re-anchors; --calibration
    scores   policies and rules (from a benchmark's results.json) scored on the policies' training reward

Bad input exits with status 2 and a one-line error before any model loads. The command modules
(commands/) import agents; they are loaded only for the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .dataset import PACKAGED, SurrogateDataError, knowledge_of, merge, read_dataset
from .fit import cross_validated, fit, summary

TARGETS = [0.3, 0.4, 0.5, 0.6]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prune_env.surrogate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:9]))
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="play exact episodes into a data set (resumable)")
    build.add_argument("--model", default="smollm2-135m")
    build.add_argument("--out", type=Path, default=PACKAGED, help="the data set (appended to, resumable)")
    build.add_argument("--rounds", type=int, default=30, help="rounds of near/random/structured/smooth draws per target")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    build.add_argument("--data", type=json.loads, default=None,
                       help='DataConfig overrides as JSON, e.g. \'{"facts": "offline-balanced", "n_facts": 0}\'')
    build.add_argument("--no-fit", dest="fit", action="store_false", help="only collect")
    build.add_argument("--device", default="cpu", help="cpu or cuda[:N] (float32 either way)")
    build.add_argument("--shard", default="0/1", help="I/N: play only the draws whose number is I modulo N")
    build.add_argument("--deadline", type=float, default=None, help="seconds after which no new draw starts")
    join = commands.add_parser("merge", help="join shards of one build into --out")
    join.add_argument("shards", type=Path, nargs="+")
    join.add_argument("--out", type=Path, required=True, help="a new file")
    join.add_argument("--perplexity-from", type=Path, nargs="+", default=[], metavar="DATA",
                      help="data sets of the same model and text but other facts (e.g. the packaged one): their "
                           "other draws join as perplexity-only records")
    for name, text in (("fit", "k-fold figures of the fit"), ("check", "check every line and each record's knowledge")):
        command = commands.add_parser(name, help=text)
        command.add_argument("data", type=Path, nargs="?", default=PACKAGED, help="a data set (default: the packaged one)")
        if name == "fit":
            command.add_argument("--folds", type=int, default=5)
            command.add_argument("--json", type=Path, default=None, help="write the figures (without per-record values)")
    visited = commands.add_parser("visited", help="surrogate vs exact reward where a trained policy goes")
    what = visited.add_mutually_exclusive_group(required=True)
    what.add_argument("--policy", help="a run folder or policy zip trained on fidelity=surrogate")
    what.add_argument("--calibration", type=Path, help="a data set: how many spreads its fit is off on each "
                      "re-anchoring round when fitted without it (sets surrogate_pessimism)")
    visited.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    visited.add_argument("--episodes", type=int, default=4, help="sampled-action episodes per target (+1 mean)")
    visited.add_argument("--preferences", type=float, nargs="+", default=None,
                         help="a preference policy's w values: each target is played at every one")
    visited.add_argument("--seed", type=int, default=0)
    visited.add_argument("--threads", type=int, default=None, help="torch threads")
    visited.add_argument("--out", type=Path, default=None, help="JSON with every allocation and the figures")
    visited.add_argument("--append", type=Path, default=None, help="surrogate data set to add the exact records to")
    scores = commands.add_parser("scores", help="policies and rules scored on the policies' training reward")
    scores.add_argument("--policy", nargs="+", required=True, help="run folders trained on fidelity=surrogate")
    scores.add_argument("--results", type=Path, required=True, help="a benchmark results.json with the rules' cells")
    scores.add_argument("--agents", nargs="+", default=["uniform", "protect-first"])
    scores.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    scores.add_argument("--pessimism", type=float, default=None, help="default: the first policy's")
    scores.add_argument("--out", type=Path, default=None, help="JSON with every row")
    return parser


def _build(args) -> None:
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard {args.shard!r} must be I/N with 0 <= I < N, e.g. 0/4")
    if args.rounds < 0:
        raise ValueError(f"--rounds {args.rounds} must be >= 0")
    if args.out.exists():
        read_dataset(args.out)  # a damaged file is named before the model loads (its header is compared after)
    import torch

    from .commands.build import build

    torch.set_num_threads(args.threads)
    build(args.model, args.out, args.rounds, args.seed, args.data, log=lambda m: print(m, flush=True),
          device=args.device, shard=(int(index), int(count)), deadline=args.deadline)
    if args.fit:
        print(summary(read_dataset(args.out)), flush=True)


def _fit(args) -> None:
    if args.folds < 2:
        raise ValueError(f"--folds {args.folds} must be >= 2")
    data = read_dataset(args.data)
    print(summary(data, args.folds), flush=True)
    if args.json is not None:
        from ..files import atomic_write_json

        figures = cross_validated(data, args.folds)
        atomic_write_json(args.json, {k: v for k, v in figures.items() if k not in ("exact", "predicted")})


def _check(args) -> None:
    """Every line is read and checked (read_dataset), the fit runs, and each record with per-fact flags must
    give back its recorded balanced metrics (1e-9) when recomputed from them."""
    data = read_dataset(args.data)
    fitted = ", ".join(fit(data).targets) if len(data.records) >= 3 else "nothing (a fit needs 3 records)"
    flagged = [r for r in data.records if "fact_greedy_exact" in r]
    off = [r.get("draw") for r in flagged if any(abs(value - r[key]) > 1e-9 for key, value
                                                 in knowledge_of(data.header, r).items() if key in r)]
    print(f"{args.data}: {len(data.records)} records, fitted {fitted}; "
          f"{len(flagged)} with per-fact flags, {len(off)} whose flags disagree with their recorded "
          f"balanced retention / accuracy{': draws ' + str(off[:10]) if off else ''}")
    if off:
        raise SurrogateDataError(f"{args.data}: {len(off)} records' per-fact flags disagree with their balanced "
                                 f"metrics (draws {off[:5]}): rebuild those records")


def _visited(args) -> None:
    from .commands import visited

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.calibration is not None:
        print(json.dumps(visited.spread_calibration(args.calibration), indent=1))
        return
    if args.episodes < 0:
        raise ValueError(f"--episodes {args.episodes} must be >= 0")
    entries, env = visited.rollouts(args.policy, args.targets, args.episodes, args.seed,
                                   None if args.preferences is None else tuple(args.preferences))
    ctx = env.unwrapped.context
    visited.replay_exact(entries, ctx, log=lambda m: print(m, flush=True))
    figures = visited.agreement(entries)
    print(json.dumps(figures, indent=1), flush=True)
    if args.out is not None:
        from ..files import atomic_write_json

        atomic_write_json(args.out, {"policy": args.policy, "figures": figures, "visited": entries})
    if args.append is not None:
        print(f"{args.append}: {visited.append(entries, args.append, args.policy, ctx)} visited records added")


def _scores(args) -> None:
    from .commands.scores import rule_allocations, scores, table

    rows = scores(args.policy, rule_allocations(args.results, args.agents), args.targets, args.pessimism)
    print(table(rows))
    if args.out is not None:
        from ..files import atomic_write_json

        atomic_write_json(args.out, {"policies": args.policy, "results": str(args.results), "rows": rows})


COMMANDS = {"build": _build, "fit": _fit, "check": _check, "visited": _visited, "scores": _scores}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "merge":
            print(f"{args.out}: {merge(args.shards, args.out, args.perplexity_from)} records merged", flush=True)
        else:
            COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
