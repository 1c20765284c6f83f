"""The LLM-prompted pruning agent (arXiv 2601.09694): sensitivity profile in, JSON move out.

Mode "iterative" plays IterativePrune-v0 on the caller's model: each step the chat model sees the
per-unit sensitivity profile, the global sparsity, the target and the budget left, plus a rolling
memory of its own past moves and their outcomes (perplexity and fact accuracy before/after, accepted
or rolled back, its own rationale): that memory is the self-reflection. The answer
`{"units": [...], "rationale": "..."}` is extracted, validated and repaired; an invalid answer is
re-asked with the error (and the answer, truncated) appended, and after `max_invalid` invalid answers
the agent falls back to the zscore-greedy pick. A move identical to the one rolled back last step is
refused (the model is unchanged, it would be rolled back again). A backend with `chooses` (the small
local model) is driven by candidate scoring instead: the agent builds a handful of valid moves and the
model picks the most likely one. Mode "oneshot" asks once for a whole allocation.

A failing backend never fails the episode by default (`on_backend_error: fallback`): the decision
falls back to zscore-greedy, and after `circuit_breaker` consecutive failed requests the circuit opens:
the backend is not called again for the rest of the episode (a dead server costs N requests, not one
per decision). `last_info["llm"]` records the failures and when the circuit opened.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.rules import match_budget
from agents.base import Agent
from agents.llm.chat import ChatBackend, LLMBackendError, LocalBackendConfig, LocalChatBackend
from agents.llm.candidates import (budget_match, candidate_allocations, candidate_moves, fallback_move,
                                   zscore_allocation)
from agents.llm.options import AgentOptions, backend_config, build_backend
from agents.llm.memory import Memory, MemoryEntry, Transcript
from agents.llm.parsing import (ALLOCATION_SCHEMA, MOVE_SCHEMA, finite_or_none, parse_move, read_answer_allocation,
                                row_index)
from agents.llm.prompts import allocation_messages, reask_messages, system_prompt, user_prompt
from prune_env.config_files import ConfigError, dataclass_from_dict
from prune_env.files import safe_name, to_jsonable
from prune_env.validation import check_choice

if TYPE_CHECKING:  # pragma: no cover
    from prune_env.context import PruningContext

log = logging.getLogger(__name__)

__all__ = ["LLMAgent"]

class _DecisionError(Exception):
    def __init__(self, record: dict):
        super().__init__("decision failed")
        self.record = record


class LLMAgent(Agent):
    """The LLM agent (registry name "llm").

    backend: {"type": "openai", ...HTTPBackendConfig} or {"type": "local", ...LocalBackendConfig}, or a
    ChatBackend instance. mode: "iterative" (plays IterativePrune-v0 on the caller's model through
    `context=ctx`, then shifts the env's final allocation onto the exact target with `match_budget`,
    since the env moves in increments) or "oneshot" (one allocation for the dense profile). agent:
    AgentOptions. env: extra IterativePrune-v0 keywords (increment, rollback_threshold, ...).
    """

    name = "llm"
    plays_env = True  # plays IterativePrune on the context it is lent

    def __init__(self, backend: dict | ChatBackend | None = None, mode: str = "iterative",
                 agent: dict | None = None, env: dict | None = None):
        super().__init__()
        self.mode = check_choice("llm mode", mode, ("iterative", "oneshot"))
        self.backend_config = None if isinstance(backend, ChatBackend) else backend_config(backend)
        self._given_backend = backend if isinstance(backend, ChatBackend) else None
        self.options = dataclass_from_dict(AgentOptions, agent, "llm agent")
        if env is not None and not isinstance(env, dict):
            raise ConfigError(f"llm env options must be a mapping of IterativePrune-v0 keywords, got {env!r}")
        self.env_kwargs = dict(env or {})
        # the local backend picks the most likely candidate (no sampling) and the env ignores the seed, so
        # its allocation does not depend on the seed; a served model may sample, so seeds are real there
        self.deterministic = isinstance(self.backend_config, LocalBackendConfig) or \
            isinstance(backend, LocalChatBackend)
        self.backend: ChatBackend | None = None
        self.memory = Memory(self.options.memory_size)
        self._reset_episode()

    def _backend(self) -> ChatBackend:
        """The backend of one `allocate`: the given instance, or a new one from the config."""
        return self._given_backend or build_backend(self.backend_config)

    def _reset_episode(self) -> None:
        self.memory.clear()
        self.fallbacks = self.invalid_answers = self.repaired_answers = 0
        self.backend_failures = self._consecutive_failures = 0
        self.moves = self.fallback_moves = 0  # moves made, and how many of them the fallback picked
        self.circuit_opened_at: int | None = None

    @property
    def llm_model(self) -> str:
        return self.backend.name if self.backend is not None else "none"

    @property
    def use_candidates(self) -> bool:
        chosen = self.options.use_candidates
        return self.backend.chooses if chosen is None else chosen

    # -- the Agent interface ----------------------------------------------------------------------
    def allocate(self, ctx: "PruningContext", target: float, seed: int) -> list[float]:
        self.last_info = {}
        transcript = None
        if self.workdir is not None:
            transcript = self.workdir / "transcripts" / f"{safe_name(self.name)}-t{target:g}-s{seed}.jsonl"
        self.backend = self._backend()
        self.last_info = {"llm_model": self.llm_model}
        numel = [unit.numel for unit in ctx.units]
        if self.mode == "oneshot":
            from prune_env.context import profile_table  # the env's rows, dense (no torch import at load)

            ratios = self.allocate_oneshot(profile_table(ctx), numel, target, transcript)
            self.last_info = to_jsonable({"llm_model": self.llm_model, "iterations": 1, "rollbacks": 0,
                                          "llm": {"mode": "oneshot", **self._health(), "transcript": transcript}})
            return [float(r) for r in ratios]
        import gymnasium as gym

        import prune_env  # noqa: F401  (registers the envs)

        # the env plays on ctx's model (lent for the episode, restored by close) and its evaluation slices
        env = gym.make("prune_env/IterativePrune-v0", context=ctx, target_sparsity=float(target), **self.env_kwargs)
        try:
            summary = self.run_iterative_episode(env, seed=seed, transcript_path=transcript)
        finally:
            env.close()
        allocation = summary["final_info"]["allocation"]
        self.last_info = {"llm_model": self.llm_model, "iterations": summary["iterations"],
                          "rollbacks": summary["rollbacks"],
                          "llm": {"mode": "iterative", "reached_sparsity": ctx.weighted_sparsity(allocation),
                                  "stopped": summary["stopped"], **self._health(), "transcript": transcript}}
        self.last_info = to_jsonable(self.last_info)
        return match_budget(allocation, numel, target)

    def _health(self) -> dict:
        """Counts of the episode; `all_fallback`: every move came from the fallback, so a result measures
        the zscore-greedy rule, not the LLM (the benchmark flags such cells)."""
        return {"moves": self.moves, "fallback_moves": self.fallback_moves,
                "all_fallback": self.moves > 0 and self.fallback_moves == self.moves,
                "fallbacks": self.fallbacks, "invalid_answers": self.invalid_answers,
                "backend_failures": self.backend_failures, "circuit_open": self.circuit_opened_at is not None,
                "circuit_opened_at": self.circuit_opened_at}

    # -- one IterativePrune-v0 episode ------------------------------------------------------------
    def run_iterative_episode(self, env, seed: int | None = None, transcript_path: str | Path | None = None) -> dict:
        """Play one episode of an env with the IterativePrune-v0 API; returns a JSON-ready summary whose
        `final_info` is the last step's info (with the env's `allocation`)."""
        if self.backend is None:
            self.backend = self._backend()
        self._reset_episode()
        transcript = Transcript(transcript_path)
        u = env.unwrapped
        names = [str(n) for n in u.unit_names]
        position = {n: i for i, n in enumerate(names)}
        _, info = env.reset(seed=seed)
        info = dict(info)
        cur_ppl, cur_acc = finite_or_none(info.get("ppl")), finite_or_none(info.get("fact_acc"))
        opts = self.options
        transcript.write({"event": "start", "task": "iterative", "time": time.time(), "llm_model": self.llm_model,
                          "backend": type(self.backend).__name__, "mode": self._mode_name(), "seed": seed,
                          "agent": asdict(opts), "env": {"n_units": len(names), "target_sparsity": u.target_sparsity,
                                                         "max_sparsity": u.max_sparsity, "increment": u.increment},
                          "reset_info": info})
        terminated = truncated = False
        iteration, total_reward, stopped, last_info = 0, 0.0, None, info
        while not (terminated or truncated):
            if opts.max_iterations is not None and iteration >= opts.max_iterations:
                stopped = f"max_iterations={opts.max_iterations} reached"
                break
            iteration += 1
            table = list(u.profile_table())
            g_before = float(u.global_sparsity)
            try:
                dec = self.decide(table, iteration=iteration, global_sparsity=g_before, target=float(u.target_sparsity),
                                  max_sparsity=float(u.max_sparsity), increment=float(u.increment))
            except _DecisionError as exc:
                transcript.write({"event": "error", "iteration": iteration, **exc.record})
                raise exc.__cause__ from None
            if not dec["units"]:
                stopped = "no unit is below the per-unit cap"
                transcript.write({"event": "stop", "iteration": iteration, "reason": stopped, **dec})
                break
            action = np.zeros(len(names), dtype=env.action_space.dtype)
            action[[position[name] for name in dec["units"]]] = 1
            _, reward, terminated, truncated, info = env.step(action)
            self.moves += 1
            self.fallback_moves += dec["source"].startswith("fallback")
            last_info = info = dict(info)
            total_reward += float(reward)
            rolled = bool(info["rolled_back"])
            ppl_after, acc_after = finite_or_none(info.get("ppl")), finite_or_none(info.get("fact_acc"))
            entry = MemoryEntry(iteration=iteration, units=list(dec["units"]), source=dec["source"],
                                rationale=dec.get("rationale", ""), rolled_back=rolled, ppl_before=cur_ppl,
                                ppl_after=ppl_after, ppl_increase=finite_or_none(info.get("ppl_increase")),
                                fact_acc_before=cur_acc, fact_acc_after=acc_after, sparsity_before=g_before,
                                sparsity_after=float(u.global_sparsity), reward=float(reward))
            self.memory.add(entry)
            if not rolled:
                cur_ppl = ppl_after if ppl_after is not None else cur_ppl
                cur_acc = acc_after if acc_after is not None else cur_acc
            transcript.write({"event": "step", "iteration": iteration, **dec,
                              "action": [i for i, a in enumerate(action) if a],
                              "outcome": {"reward": reward, "terminated": terminated, "truncated": truncated,
                                          "info": info},
                              "memory_entry": asdict(entry), "memory_text": entry.describe()})
        summary = {"agent": self.name, "llm_model": self.llm_model, "backend": type(self.backend).__name__,
                   "mode": self._mode_name(), "seed": seed, "iterations": iteration,
                   "rollbacks": int(last_info["rollbacks"]), "repaired_answers": self.repaired_answers,
                   **self._health(), "total_reward": total_reward, "terminated": bool(terminated),
                   "truncated": bool(truncated), "stopped": stopped,
                   "achieved_sparsity": finite_or_none(last_info.get("achieved_sparsity")),
                   "final_info": to_jsonable(last_info), "transcript": transcript_path}
        transcript.write({"event": "end", "summary": summary})
        return to_jsonable(summary)

    def _mode_name(self) -> str:
        return "candidate-scoring" if self.use_candidates else "json"

    # -- one decision -----------------------------------------------------------------------------
    def decide(self, table: list[dict], *, iteration: int, global_sparsity: float, target: float,
               max_sparsity: float, increment: float) -> dict:
        """One move: a record with `units`, `rationale`, `source` ("llm", "llm-repaired",
        "candidate-scoring" or "fallback:zscore-greedy") and the `attempts` (prompts, answers, errors)."""
        k = self.options.max_units_per_step
        user = user_prompt(table, self.memory, max_units=k, iteration=iteration, global_sparsity=global_sparsity,
                           target=target, max_sparsity=max_sparsity, increment=increment)
        messages = [{"role": "system", "content": system_prompt(k, increment, max_sparsity, self.options.preference)},
                    {"role": "user", "content": user}]
        rec: dict[str, Any] = {"mode": self._mode_name(), "attempts": []}
        if self.circuit_opened_at is not None:
            reason = (f"circuit open since iteration {self.circuit_opened_at} after "
                      f"{self.options.circuit_breaker} consecutive failed backend requests")
            return self._fallback(rec, table, max_sparsity, reason)
        if self.use_candidates:
            return self._decide_by_candidates(rec, messages, table, max_sparsity, iteration)
        invalid = 0
        while invalid < self.options.max_invalid:
            try:
                raw, meta = self._ask(messages, MOVE_SCHEMA)
            except LLMBackendError as exc:
                rec["attempts"].append({"prompt": list(messages), "error": str(exc), "backend_error": True,
                                        **self._request_meta()})
                self._backend_failed(rec, exc, iteration)
                break
            attempt = {"prompt": list(messages), "raw": raw, **meta}
            rec["attempts"].append(attempt)
            parsed = parse_move(raw, table, max_sparsity=max_sparsity, max_units=k)
            attempt["parsed"] = asdict(parsed)
            error = parsed.error
            if error is None and self.memory.repeats_rollback(parsed.units):
                error = ("this exact move was rolled back in the previous step and the model is unchanged, "
                         "so it would be rolled back again; choose different or fewer units")
            if error is None:
                if parsed.repairs:
                    self.repaired_answers += 1
                    attempt["repairs"] = parsed.repairs
                return {**rec, "units": parsed.units, "rationale": parsed.rationale,
                        "source": "llm-repaired" if parsed.repairs else "llm", "repairs": parsed.repairs}
            invalid += 1
            self.invalid_answers += 1
            attempt["error"] = error
            log.info("invalid LLM answer (%d/%d): %s", invalid, self.options.max_invalid, error)
            if invalid < self.options.max_invalid:
                messages = reask_messages(messages, raw, error, (
                    f"Reply again with ONLY one JSON object of the form {MOVE_SCHEMA}, using 1 to {k} unit names "
                    "from the profile table that are not at the CAP."))
        return self._fallback(rec, table, max_sparsity, rec.get("backend_error") or f"{invalid} invalid answer(s)")

    def _decide_by_candidates(self, rec: dict, messages: list[dict], table: list[dict], max_sparsity: float,
                              iteration: int) -> dict:
        k, cooldown = self.options.max_units_per_step, self.options.rollback_cooldown
        cands = candidate_moves(table, max_sparsity, k, self.memory, cooldown)
        if not cands:
            return {**rec, "units": [], "rationale": "", "source": "none", "note": "no unit is below the cap"}
        texts = [json.dumps({"units": u, "rationale": w}) for u, w in cands]
        t0 = time.perf_counter()
        try:
            best = int(self.backend.choose(messages, texts))
        except LLMBackendError as exc:
            rec["attempts"].append({"prompt": messages, "candidates": texts, "error": str(exc)})
            self._backend_failed(rec, exc, iteration)
            return self._fallback(rec, table, max_sparsity, str(exc))
        self._consecutive_failures = 0
        attempt = {"prompt": messages, "candidates": texts, "chosen": best, "scores": self.backend.last_scores,
                   "seconds": round(time.perf_counter() - t0, 3),
                   "note": "candidate scoring: the model picked the most likely of these valid moves"}
        rec["attempts"].append(attempt)
        if 0 <= best < len(texts):
            parsed = parse_move(texts[best], table, max_sparsity=max_sparsity, max_units=k)
            if parsed.ok:
                attempt["parsed"] = asdict(parsed)
                return {**rec, "units": parsed.units, "rationale": parsed.rationale, "source": "candidate-scoring",
                        "repairs": []}
            attempt["error"] = parsed.error
        else:
            attempt["error"] = f"choose() returned {best!r}"
        return self._fallback(rec, table, max_sparsity, attempt["error"])

    def _fallback(self, rec: dict, table: list[dict], max_sparsity: float, reason: str) -> dict:
        self.fallbacks += 1
        units = fallback_move(table, max_sparsity, self.options.max_units_per_step, self.memory,
                              self.options.rollback_cooldown)
        log.warning("LLM agent fell back to zscore-greedy (%s): %s", reason, units)
        return {**rec, "units": units, "rationale": "zscore-greedy fallback", "source": "fallback:zscore-greedy",
                "fallback_reason": reason}

    def _backend_failed(self, rec: dict, exc: LLMBackendError, iteration: int) -> None:
        """Count a failed request; raise (on_backend_error="raise") or maybe open the circuit."""
        rec["backend_error"] = str(exc)
        self.backend_failures += 1
        self._consecutive_failures += 1
        if self.options.on_backend_error == "raise":
            raise _DecisionError(rec) from exc
        if self._consecutive_failures >= self.options.circuit_breaker and self.circuit_opened_at is None:
            self.circuit_opened_at = iteration
            rec["circuit_opened"] = True
            log.warning("LLM backend failed %d times in a row: circuit open, zscore-greedy for the rest of the "
                        "episode", self._consecutive_failures)

    def _ask(self, messages: list[dict], schema: str) -> tuple[str, dict]:
        t0 = time.perf_counter()
        try:
            raw = self.backend.complete(messages, schema_hint=schema)
        finally:
            seconds = round(time.perf_counter() - t0, 3)
        self._consecutive_failures = 0
        return raw, {"seconds": seconds, **self._request_meta()}

    def _request_meta(self) -> dict:
        request = self.backend.last_request
        if request is None:
            return {}
        return {"backend_attempts": request["attempts"], "backend_errors": list(request["errors"])}

    # -- one whole allocation (mode "oneshot") ----------------------------------------------------
    def allocate_oneshot(self, table: list[dict], numel: list[float] | dict, target: float,
                         transcript_path: str | Path | None = None) -> list[float]:
        """One allocation for the profile `table`, ordered by its `index`, clipped to [0, 0.95] and
        budget-matched (numel-weighted mean == target). `numel`: per-unit parameter counts, a list by
        index or a dict by unit name."""
        if self.backend is None:
            self.backend = self._backend()
        self._reset_episode()
        table = sorted(table, key=lambda r: row_index(r, 0))
        names = [str(r["unit"]) for r in table]
        n = [float(numel[name]) for name in names] if isinstance(numel, dict) else \
            [float(numel[row_index(r, i)]) for i, r in enumerate(table)]
        target = float(target)
        messages = allocation_messages(table, target, self.options.preference)
        rec: dict[str, Any] = {"event": "allocate", "time": time.time(), "llm_model": self.llm_model,
                               "backend": type(self.backend).__name__, "mode": self._mode_name(), "target": target,
                               "attempts": []}
        ratios, rationale, source = None, "", None
        try:
            if self.use_candidates:
                cands = candidate_allocations(table, n, target)
                best = int(self.backend.choose(messages, [c[3] for c in cands]))
                rec["attempts"].append({"prompt": messages, "candidates": [c[0] for c in cands], "chosen": best,
                                        "scores": self.backend.last_scores,
                                        "note": "candidate scoring over valid allocations"})
                if 0 <= best < len(cands):
                    ratios, rationale, source = list(cands[best][1]), cands[best][2], "candidate-scoring"
            else:
                invalid = 0
                while invalid < self.options.max_invalid:
                    raw, meta = self._ask(messages, ALLOCATION_SCHEMA)
                    values, why, repairs, error = read_answer_allocation(raw, table, fill=target)
                    rec["attempts"].append({"prompt": list(messages), "raw": raw, **meta, "repairs": repairs,
                                            "error": error})
                    if error is None:
                        ratios, rationale, source = values, why, "llm-repaired" if repairs else "llm"
                        break
                    invalid += 1
                    self.invalid_answers += 1
                    if invalid < self.options.max_invalid:
                        messages = reask_messages(messages, raw, error, "Reply again with ONLY one JSON object "
                                                  f"of the form {ALLOCATION_SCHEMA}.")
        except LLMBackendError as exc:
            try:
                self._backend_failed(rec, exc, 1)
            except _DecisionError:
                Transcript(transcript_path).write(rec)
                raise exc from None
        if ratios is None:
            self.fallbacks += 1
            ratios, rationale, source = zscore_allocation(table, n, target), "zscore fallback", "fallback:zscore"
            log.warning("LLM allocation fell back to the z-score allocation")
        self.moves, self.fallback_moves = 1, int(source.startswith("fallback"))
        matched = budget_match(ratios, n, target)
        rec.update({"source": source, "rationale": rationale, "raw_ratios": ratios, "ratios": matched, "units": names})
        Transcript(transcript_path).write(rec)
        return matched
