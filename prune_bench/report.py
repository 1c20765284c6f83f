"""report.md and the plots of a results.json: mean ± std over seeds, and paired bootstrap intervals
against uniform (prune_bench.intervals) that decide which agent beats it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prune_env.files import atomic_write_text

from .fronts import front_lines
from .intervals import N_RESAMPLES, Comparison, Interval, fact_labels, has_paired_data, paired_bootstrap
from .store import ANSWER_PPL, BALANCED, METRICS

BASELINE = "uniform"
OLD_RECORD = "no interval (old record)"
FALLBACK_MARK = " †"
FALLBACK_NOTE = ("† {agent}: every move of {n} of the {ok} ok seed(s) came from the zscore-greedy fallback "
                 "(the LLM gave no usable answer): the row measures the fallback rule, not the LLM; see \"LLM runs\".")


def all_fallback(rec: dict) -> bool:
    """True for an LLM record none of whose moves came from the LLM."""
    return bool((rec.get("llm") or {}).get("all_fallback"))


def _label(row: dict) -> str:
    return row["agent"] + (FALLBACK_MARK if row.get("all_fallback") else "")


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(data: dict) -> list[dict]:
    """Mean and sample std over seeds of every ok (agent, target), in record order."""
    groups: dict[tuple, list[dict]] = {}
    for rec in data["records"]:
        groups.setdefault((rec["agent"], round(rec["target_sparsity"], 9)), []).append(rec)
    rows = []
    for (agent, target), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        row = {"agent": agent, "target": target, "n_ok": len(ok), "n_failed": len(recs) - len(ok), "records": ok,
               "all_fallback": sum(all_fallback(r) for r in ok)}
        for key in (*METRICS, "achieved_sparsity"):
            if ok:
                row[key] = _stats([r[key] for r in ok])
        for key in (*BALANCED, ANSWER_PPL):  # absent in records written before the metric: no cell then
            if ok and all(r.get(key) is not None for r in ok):
                row[key] = _stats([r[key] for r in ok])
        if ok and all(r.get("retention_by_relation") is not None for r in ok):
            names = sorted({name for r in ok for name in r["retention_by_relation"]})
            row["retention_by_relation"] = {name: _stats([r["retention_by_relation"].get(name, float("nan"))
                                                          for r in ok]) for name in names}
        computed = [r["seconds"] for r in ok if r.get("reused_from_seed") is None]
        if computed:
            row["seconds"] = _stats(computed)
        if ok:
            row["allocation"] = np.mean([r["allocation"] for r in ok], axis=0).tolist()
        rows.append(row)
    return rows


def baseline_label(data: dict) -> str | None:
    """The label of the first uniform agent, the baseline of the intervals (None without one)."""
    for rec in data["records"]:
        if (rec.get("agent_config") or {}).get("name") == BASELINE:
            return rec["agent"]
    return None


def compare(data: dict, agent_records: list[dict], baseline_records: list[dict]) -> Comparison | str:
    """The paired comparison of one (agent, target) against the baseline, or why there is none."""
    by_seed = {r["seed"]: r for r in baseline_records}
    pairs = [(r, by_seed[r["seed"]]) for r in agent_records if r["seed"] in by_seed]
    if not pairs:
        return "no interval (no ok uniform record of the same seed)"
    if not all(has_paired_data(r) for pair in pairs for r in pair):
        return OLD_RECORD
    dense_exact = (data.get("dense_per_fact") or {}).get("greedy_exact")
    return paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], dense_exact, labels=fact_labels(data))


def _fallback_moves(rec: dict) -> str:
    """'2/5', '5/5 (all)', or '-' for records written before moves were counted."""
    llm = rec.get("llm") or {}
    if "moves" not in llm:
        return "-"
    return f"{llm['fallback_moves']}/{llm['moves']}" + (" (all)" if llm["all_fallback"] else "")


def _fmt(pair, digits=3) -> str:
    if pair is None:
        return "-"
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_interval(interval: Interval | None, digits: int = 3, tie: str = "", missing: str = "-") -> str:
    """`estimate [low, high]` and the verdict (the report leaves ties unmarked; a summary may name them)."""
    if interval is None:
        return missing
    mark = {"beats": "**beats**", "worse": "worse", "tie": tie}[interval.verdict]
    return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]" + \
        (f" {mark}" if mark else "")


def interval_lines(data: dict, rows: list[dict], target: float) -> list[str]:
    baseline = baseline_label(data)
    by = {(r["agent"], r["target"]): r for r in rows}
    base_row = by.get((baseline, target))
    if baseline is None or base_row is None:
        return []
    lines = [f"Paired bootstrap vs {baseline} ({N_RESAMPLES} resamples of windows and facts, 95 %): "
             "**beats** only where the interval excludes no difference.", "",
             "| agent | ppl ratio (agent/uniform) | fact acc diff | retention diff | balanced retention diff |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row["target"] != target or row["agent"] == baseline or not row["records"]:
            continue
        result = compare(data, row["records"], base_row["records"])
        if isinstance(result, str):
            lines.append(f"| {_label(row)} | {result} | | | |")
        else:
            lines.append(f"| {_label(row)} | {format_interval(result.ppl_ratio, 4)} | {format_interval(result.acc_diff)} "
                         f"| {format_interval(result.retention_diff)} | {format_interval(result.balanced_retention_diff)} |")
    return lines + [""]


def _baseline_note(data: dict) -> str:
    value = (data.get("knowledge_baseline") or {}).get("fact_retention_balanced")
    return "majority baseline " + (f"{value:.3f}" if value is not None else "-")


def knowledge_lines(data: dict) -> list[str]:
    """What the balanced retention is and the majority baselines it must clear (files that have them)."""
    base = data.get("knowledge_baseline")
    if not base:
        return []
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [f"- knowledge: balanced retention weighs every distinct answer of a relation the same and every relation "
            f"the same (prune_env/data/knowledge.py); the majority baseline is what always answering each relation's "
            f"most frequent dense-known answer scores: balanced {fmt(base.get('fact_retention_balanced'))}, plain "
            f"{fmt(base.get('fact_retention'))}"]


def relation_lines(data: dict, rows: list[dict], target: float) -> list[str]:
    """Balanced retention per relation (mean ± std over seeds), the majority baseline in the header."""
    base = (data.get("knowledge_baseline") or {}).get("retention_by_relation") or {}
    mine = [r for r in rows if r["target"] == target and r.get("retention_by_relation")]
    names = sorted(set(base) | {name for r in mine for name in r["retention_by_relation"]})
    if not mine or not names:
        return []
    head = " | ".join(f"{name} ({'-' if base.get(name) is None else format(base[name], '.3f')})" for name in names)
    lines = ["Balanced retention per relation (majority baseline in brackets):", "", f"| agent | {head} |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {_label(r)} | " + " | ".join(_fmt(r["retention_by_relation"].get(name)) for name in names) + " |"
              for r in mine]
    return lines + [""]


def write_report(data: dict, out: str | Path, allocation_target: float | None = None) -> Path:
    """report.md with one table per target sparsity, the intervals against uniform and three plots."""
    out = Path(out)
    rows = summarise(data)
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    by = {(r["agent"], r["target"]): r for r in rows}
    dense = data.get("dense") or {}
    d = data["data"]
    text = d.get("text", {})
    operator = data["operator"]
    lines = [f"# Benchmark: {data['model']}", "",
             f"- operator: {operator['method']}{' ' + operator['pattern'] if operator.get('pattern') else ''}, "
             f"granularity {operator['granularity']}, {len(data.get('units') or [])} units",
             f"- evaluation: {text.get('evaluation', {}).get('tokens', '?')} tokens of {text.get('source')!r} "
             f"(region {text.get('evaluation', {}).get('region')}), {d.get('facts', {}).get('n', '?')} facts "
             f"(offset {d.get('facts', {}).get('offset')}) of {d.get('facts', {}).get('source')!r}",
             f"- calibration: {text.get('calibration', {}).get('samples')} x "
             f"{text.get('calibration', {}).get('seq_len')} tokens; seeds change only the agents",
             f"- machine: {data['machine'].get('platform')}, {data['machine'].get('cpu_count')} CPUs, "
             f"torch {data['machine'].get('torch')}, transformers {data['machine'].get('transformers')}, "
             f"device {data['machine'].get('device')}",
             f"- dense: ppl {dense.get('ppl', float('nan')):.3f}, fact acc {dense.get('fact_acc', float('nan')):.3f}",
             *knowledge_lines(data), "", "Cells show mean ± sample std over the ok seeds.", ""]
    for target in targets:
        lines += [f"## Target sparsity {target:g}", "",
                  f"| agent | ok/failed | ppl | fact acc | retention | balanced retention ({_baseline_note(data)}) "
                  "| balanced acc | answer ppl | fact nll | achieved | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for agent in agents:
            r = by.get((agent, target))
            if r is not None:
                lines.append(f"| {_label(r)} | {r['n_ok']}/{r['n_failed']} | {_fmt(r.get('ppl'))} | "
                             f"{_fmt(r.get('fact_acc'))} | {_fmt(r.get('fact_retention'))} | "
                             f"{_fmt(r.get('fact_retention_balanced'))} | {_fmt(r.get('fact_acc_balanced'))} | "
                             f"{_fmt(r.get(ANSWER_PPL), 2)} | {_fmt(r.get('fact_nll'))} | "
                             f"{_fmt(r.get('achieved_sparsity'), 4)} | "
                             f"{_fmt(r.get('seconds'), 1)} |")
        lines.append("")
        lines += relation_lines(data, rows, target)
        notes = [FALLBACK_NOTE.format(agent=r["agent"], n=r["all_fallback"], ok=r["n_ok"])
                 for r in rows if r["target"] == target and r["all_fallback"]]
        lines += [*notes, ""] if notes else []
        lines += interval_lines(data, rows, target)
        lines += front_lines(data, rows, target, out, baseline_label(data))
    failed = [rec for rec in data["records"] if rec["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {rec['agent']} t={rec['target_sparsity']:g} seed {rec['seed']}: "
                  f"`{str(rec['error']).splitlines()[0][:300]}`" for rec in failed]
        lines.append("")
    llm = [rec for rec in data["records"] if rec.get("llm_model") and rec["status"] == "ok"]
    if llm:
        lines += ["## LLM runs", "", "| agent | target | seed | model | iterations | rollbacks | fallback moves |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['agent']} | {r['target_sparsity']:g} | {r['seed']} | {r['llm_model']} | "
                  f"{r['iterations']} | {r['rollbacks']} | {_fallback_moves(r)} |" for r in llm]
        lines.append("")
    if data.get("exports"):
        lines += ["## Exports", ""]
        lines += [f"- {e.get('cell')}: `{e.get('dir')}` " + (f"FAILED `{e['error']}`" if e.get("error") else
                  f"ppl {e.get('ppl')} reloaded {e.get('ppl_reloaded')} {'ok' if e.get('ok') else 'MISMATCH'}")
                  for e in data["exports"]]
        lines.append("")
    plots = write_plots(data, out, rows, allocation_target)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_plots(data: dict, out: Path, rows: list[dict], allocation_target: float | None) -> list[str]:
    """allocation_t<target>.png, ppl_vs_sparsity.png and facts_vs_sparsity.png (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(r["agent"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    by = {(r["agent"], r["target"]): r for r in rows}
    dense = data.get("dense") or {}
    ok_targets = [t for t in targets if any(by[(a, t)].get("allocation") for a in agents if (a, t) in by)]
    if not ok_targets:
        return []
    plots = []
    chosen = ok_targets if allocation_target is None else [min(ok_targets, key=lambda t: abs(t - allocation_target))]
    for target in chosen:
        fig, ax = plt.subplots(figsize=(9, 4))
        for agent in agents:
            r = by.get((agent, target))
            if r and r.get("allocation"):
                ax.plot(range(len(r["allocation"])), r["allocation"], marker="o", ms=3, label=agent)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="unit (model order)", ylabel="sparsity", title=f"Per-unit allocation at target {target:g}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"allocation_t{target:g}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        plots.append(name)

    def curves(ax, key: str) -> None:
        for agent in agents:
            pts = [(t, by[(agent, t)][key]) for t in targets if (agent, t) in by and by[(agent, t)].get(key)]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                            marker="o", capsize=3, label=agent)

    fig, ax = plt.subplots(figsize=(6, 4))
    curves(ax, "ppl")
    if dense.get("ppl"):
        ax.axhline(dense["ppl"], color="grey", lw=0.8, ls="--", label="dense")
    ax.set(xlabel="target sparsity", ylabel="perplexity", yscale="log", title="Perplexity vs sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_sparsity.png", dpi=110)
    plt.close(fig)
    plots.append("ppl_vs_sparsity.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    balanced = any(r.get("fact_retention_balanced") for r in rows)
    retention = ("fact_retention_balanced", "Balanced fact retention") if balanced else ("fact_retention",
                                                                                          "Fact retention")
    for ax, key, title in ((axes[0], "fact_acc", "Fact accuracy"), (axes[1], *retention)):
        curves(ax, key)
        if key == "fact_acc" and dense.get("fact_acc") is not None:
            ax.axhline(dense["fact_acc"], color="grey", lw=0.8, ls="--", label="dense")
        ax.set(xlabel="target sparsity", ylabel=key, title=f"{title} vs sparsity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "facts_vs_sparsity.png", dpi=110)
    plt.close(fig)
    plots.append("facts_vs_sparsity.png")
    return plots
