"""Reproduce the README's one-shot table: dense, magnitude/Wanda/SparseGPT at 50 %, Wanda 2:4 on SmolLM2.

    python scripts/foundation_table.py [--out docs/results/foundation]

Each row is one `python -m prune_env.cli` run with the README's data, passed explicitly (SLICES: 20,480
evaluation tokens, calibration 16 x 512, all 917 facts) since the CLI's own defaults are DataConfig's smaller
episode slices; the script collects their metrics.json into table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

SLICES = ["--eval-tokens", "20480", "--calib-samples", "16", "--calib-seq-len", "512", "--n-facts", "0"]
RUNS = [
    ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("Wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
    ("SparseGPT 50%", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("Wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/results/foundation")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, extra in RUNS:
        run_dir = out / "runs" / label.replace(" ", "_").replace("%", "").replace(":", "-").lower()
        if not (run_dir / "metrics.json").exists():
            cmd = [sys.executable, "-m", "prune_env.cli", "--model", args.model, *extra, *SLICES,
                   "--no-save-model", "--out", str(run_dir)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append((label, " ".join(extra), metrics))
    dense = rows[0][2]["dense"]
    lines = ["| model state | command flags | handbook ppl | fact MC acc | fact retention | achieved sparsity | prune s | eval s |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | | {dense['ppl']:.2f} | {dense['fact_acc']:.3f} | 1.000 | 0 | | |"]
    for label, flags, m in rows:
        p, s = m["pruned"], m["seconds"]
        lines.append(f"| {label} | `{flags}` | {p['ppl']:.2f} | {p['fact_acc']:.3f} | {p['fact_retention']:.3f} | "
                     f"{m['achieved_sparsity']:.4f} | {s['prune']:.1f} | {s['eval_pruned']:.1f} |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = "\n".join(lines) + f"\n\nModel {args.model}, float32, CPU ({machine}).\n"
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps([{"label": l, "flags": f, **m} for l, f, m in rows], indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
