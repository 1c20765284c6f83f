"""Replay the allocations another benchmark run chose: the re-check of decisions on unseen data.

An allocation decided on one text (the agents saw only its reward slices) is applied unchanged to a
model calibrated and evaluated on another text, so a win that does not transfer shows up::

    agent = build_agent({"name": "replay", "results": "docs/results/learned-smollm2/results.json",
                         "agent": "ppo-s0"})
    ratios = agent.allocate(ctx, 0.5, seed=0)   # that run's ppo-s0 allocation at 0.5, seed 0
"""

from __future__ import annotations

import json
from pathlib import Path

from agents.base import Agent

__all__ = ["ReplayAgent"]


class ReplayAgent(Agent):
    """The allocation `agent` chose at the requested target (and seed) in a benchmark's results.json."""

    name = "replay"
    deterministic = True

    def __init__(self, results: str, agent: str, seed: int | None = None):
        super().__init__()
        path = Path(results)
        if not path.is_file():
            raise ValueError(f"replay results {results!r} is not a file: give a benchmark's results.json")
        try:
            records = json.loads(path.read_text())["records"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"replay results {results!r} is not a benchmark results.json: {error}") from None
        self.results, self.agent, self.seed = str(path), str(agent), seed
        self._records = [r for r in records if r.get("agent") == agent and r.get("status") == "ok"]
        if not self._records:
            agents = sorted({r.get("agent") for r in records})
            raise ValueError(f"{results!r} has no finished cell of agent {agent!r}: it has {agents}")

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        wanted = seed if self.seed is None else self.seed
        for record in self._records:
            if abs(record["target_sparsity"] - target) < 1e-9 and record["seed"] == wanted:
                if len(record["allocation"]) != len(ctx.units):
                    raise ValueError(f"{self.agent!r}'s allocation has {len(record['allocation'])} ratios but the "
                                     f"model has {len(ctx.units)} units: replay on the same model and granularity")
                self.last_info = {"replay": {"results": self.results, "agent": self.agent, "seed": wanted}}
                return list(record["allocation"])
        have = sorted({(r["target_sparsity"], r["seed"]) for r in self._records})
        raise ValueError(f"{self.results!r} has no {self.agent!r} cell at target {target}, seed {wanted}: it has {have}")
