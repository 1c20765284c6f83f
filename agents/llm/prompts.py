"""The prompts of the LLM agent: the profile table as text, the step prompt with its memory, re-asks.

Everything an answer contributes to a later prompt passes through `parsing.truncate_text`, so a
runaway answer cannot grow the prompts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agents.llm.parsing import ALLOC_MAX_RATIO, ALLOCATION_SCHEMA, EPS, MOVE_SCHEMA, row_index, truncate_text

if TYPE_CHECKING:  # pragma: no cover
    from agents.llm.memory import Memory

__all__ = ["allocation_messages", "format_profile_table", "preference_sentence", "reask_messages", "system_prompt",
           "user_prompt"]


def format_profile_table(table: list[dict], max_sparsity: float) -> str:
    """Fixed-width text table of the sensitivity profile (rows at the cap marked CAP)."""
    rows = sorted(enumerate(table), key=lambda p: row_index(p[1], p[0]))
    width = max([4] + [len(str(r["unit"])) for _, r in rows])
    lines = [f"{'idx':>3}  {'unit':<{width}}  {'z_wanda':>7}  {'z_grad':>7}  {'z_sum':>7}  {'sparsity':>8}  {'share':>6}"]
    for pos, r in rows:
        zw, zg = float(r["z_wanda"]), float(r["z_grad"])
        sp = float(r["sparsity"])
        cap = "  CAP" if sp >= max_sparsity - EPS else ""
        lines.append(
            f"{row_index(r, pos):>3}  {str(r['unit']):<{width}}  {zw:>+7.2f}  {zg:>+7.2f}  {zw + zg:>+7.2f}"
            f"  {sp:>8.1%}  {float(r.get('param_share', 0.0)):>6.1%}{cap}"
        )
    return "\n".join(lines)


def preference_sentence(preference: float | None) -> str:
    """The trade-off a preference-conditioned LayerPrune episode pays (`rewards.preference_quality`), in one
    sentence ending in a newline; "" without a preference."""
    if preference is None:
        return ""
    w = float(preference)
    return (f"Preference: weight {w:.2f} on keeping factual knowledge (answer-balanced retention of the facts the "
            f"dense model knows) and {1 - w:.2f} on perplexity; the score is {1 - w:.2f} x (-log(perplexity / "
            f"dense perplexity)) + {w:.2f} x (retention - 1).\n")


def system_prompt(max_units: int, increment: float, max_sparsity: float, preference: float | None = None) -> str:
    """The rules of IterativePrune-v0 and the answer format, for a model that has never seen the env;
    `preference` (w in [0, 1]) adds the trade-off sentence after the goal."""
    k = max_units
    return (
        "You are a pruning agent. You compress a language model by unstructured (Wanda-style) "
        "weight pruning, one step at a time.\n"
        f"Each step you choose 1 to {k} units (decoder blocks or linear layers); each chosen unit "
        f"gets {increment:.1%} more sparsity (its weakest remaining weights are zeroed). After the "
        "step the environment measures perplexity (lower is better) and fact-recall accuracy. If "
        "perplexity degrades by more than its threshold, the step is ROLLED BACK (undone).\n"
        "Goal: reach the target global sparsity while keeping perplexity low and factual knowledge "
        "intact.\n"
        f"{preference_sentence(preference)}"
        "Sensitivity profile columns:\n"
        "- z_wanda: z-score across units of the 10th percentile of the Wanda score |W|*||X|| of the "
        "surviving weights (low = its weakest weights matter little).\n"
        "- z_grad: z-score across units of the mean |gradient| of the LM loss (low = less important).\n"
        "- z_sum = z_wanda + z_grad: combined importance; lower is safer to prune.\n"
        f"- sparsity: current fraction of zeroed weights; units marked CAP are at the per-unit maximum "
        f"{max_sparsity:.0%} and cannot be chosen.\n"
        f"- share: the unit's fraction of all prunable weights; a chosen unit raises global sparsity by "
        f"about share x {increment:.1%}.\n"
        "Rules:\n"
        f"- Choose between 1 and {k} distinct units by their exact name from the unit column (an idx "
        "number is accepted too); never a CAP unit.\n"
        "- Prefer units with low z_sum, spread pruning across units instead of hammering one, and "
        "learn from your memory: avoid repeating moves that were rolled back or hurt fact accuracy.\n"
        "- Reply with ONLY one JSON object, no other text, exactly of this form:\n"
        f"{MOVE_SCHEMA}"
    )


def user_prompt(table: list[dict], memory: "Memory", *, max_units: int, iteration: int,
                global_sparsity: float, target: float, max_sparsity: float, increment: float) -> str:
    """This step's state (profile table, budget left) and the self-reflection memory of past moves."""
    left = max(target - global_sparsity, 0.0)
    lines = [
        f"Step {iteration}. Global sparsity {global_sparsity:.2%}, target {target:.2%}, "
        f"budget left {left:.2%} of all prunable weights.",
        f"Per-unit increment {increment:.1%}, per-unit cap {max_sparsity:.0%}, at most "
        f"{max_units} units per step.",
        "",
        "Sensitivity profile:",
        format_profile_table(table, max_sparsity),
        "",
    ]
    if memory.entries:
        omitted = memory.omitted
        lines.append("Memory of your past moves and their outcomes (oldest first"
                     + (f"; {omitted} earlier move(s) omitted" if omitted > 0 else "") + "):")
        lines.extend(e.describe() for e in memory.entries)
        lines.append("")
        lines.append(
            "Reflect on this memory before choosing: which moves raised perplexity or lowered fact "
            "accuracy, which were cheap, and why were any rolled back? Put that lesson and the reason "
            "for your choice in the one-line rationale."
        )
    else:
        lines.append("Memory of your past moves: none yet (this is the first move).")
    lines.append(f"Answer with the JSON object only: {MOVE_SCHEMA}")
    return "\n".join(lines)


def allocation_messages(table: list[dict], target: float, preference: float | None = None) -> list[dict]:
    """The one-shot question: a sparsity ratio for every unit at once (mode "oneshot"); `preference` as in
    `system_prompt`."""
    system = (
        "You are a pruning agent. You choose a per-unit sparsity ratio (fraction of weights zeroed by "
        "unstructured Wanda-style pruning) for every unit of a language model, in one shot.\n"
        "Goal: the parameter-weighted mean sparsity must equal the target while perplexity and "
        "factual knowledge suffer as little as possible. Give more sparsity to units with low z_sum "
        "(z_wanda + z_grad: z-scored Wanda weight-activation and gradient importance; low = less "
        f"important) and less to sensitive units. Ratios must lie in [0, {ALLOC_MAX_RATIO}]; the "
        "environment rescales them to match the budget exactly.\n"
        f"{preference_sentence(preference)}"
        "Reply with ONLY one JSON object, no other text, exactly of this form:\n"
        f"{ALLOCATION_SCHEMA}"
    )
    user = (
        f"Target mean sparsity: {target:.2%} (weighted by share).\n\nSensitivity profile:\n"
        f"{format_profile_table(table, math.inf)}\n\n"
        f"Give a ratio for every unit. Answer with the JSON object only: {ALLOCATION_SCHEMA}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def reask_messages(messages: list[dict], answer: str, error: str, instruction: str) -> list[dict]:
    """`messages` plus the invalid answer (truncated) and the error, asking again.

    The answer is cut to `MAX_ANSWER_CHARS` (marked as truncated) and so is the error, which can
    quote the answer: each re-ask adds a bounded amount of text.
    """
    return messages + [
        {"role": "assistant", "content": truncate_text(answer)},
        {"role": "user", "content": f"Your answer was invalid: {truncate_text(error)}. {instruction}"},
    ]
