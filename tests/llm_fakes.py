"""Test doubles for the LLM agent tests: an env with exactly the IterativePrune-v0 API the agent uses,
and in-process chat backends. The HTTP backend is tested against tests/fake_openai_server.py instead."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import gymnasium as gym
import numpy as np

from agents.llm import ChatBackend

Z_WANDA = [0.5, -1.0, -0.2, 1.2, -0.5, 0.0]
Z_GRAD = [0.3, -0.4, 0.1, 0.9, 0.2, -1.1]
# z_sum = [0.8, -1.4, -0.1, 2.1, -0.3, -1.1] -> ascending order: 1, 5, 4, 2, 0, 3


class FakeIterativeEnv(gym.Env):
    """IterativePrune-v0's agent-facing API on six units; perplexity grows with the squared sparsities."""

    def __init__(self, n_units=6, increment=0.1, target=0.15, max_sparsity=0.5, rollback_on=(), fail_on_step=None,
                 max_steps=20):
        self.unit_names = [f"model.layers.{i}" for i in range(n_units)]
        self.increment = increment
        self.target_sparsity = target
        self.max_sparsity = max_sparsity
        self.rollback_on = set(rollback_on)
        self.fail_on_step = fail_on_step
        self.max_steps = max_steps
        self.action_space = gym.spaces.MultiBinary(n_units)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n_units * 3,), np.float32)
        self.share = np.full(n_units, 1.0 / n_units)
        self.actions: list[list[int]] = []
        self.reset()

    @property
    def global_sparsity(self) -> float:
        return float((self.sparsity * self.share).sum())

    def _ppl(self, sp):
        return 10.0 * math.exp(float((sp ** 2).sum()))

    def _obs(self):
        n = len(self.sparsity)
        return np.concatenate([Z_WANDA[:n], Z_GRAD[:n], self.sparsity]).astype(np.float32)

    def profile_table(self):
        return [{"unit": n, "index": i, "z_wanda": Z_WANDA[i], "z_grad": Z_GRAD[i],
                 "sparsity": float(self.sparsity[i]), "param_share": float(self.share[i])}
                for i, n in enumerate(self.unit_names)]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.sparsity = np.zeros(len(self.unit_names))
        self.steps = 0
        self.rollbacks = 0
        self.ppl = self._ppl(self.sparsity)
        return self._obs(), {"ppl": self.ppl, "fact_acc": 0.8, "rollbacks": 0, "rolled_back": False,
                             "allocation": self.sparsity.tolist(), "achieved_sparsity": 0.0}

    def step(self, action):
        self.steps += 1
        if self.fail_on_step == self.steps:
            raise RuntimeError("simulated crash")
        a = np.asarray(action).astype(bool)
        self.actions.append([int(i) for i in np.flatnonzero(a)])
        new = np.minimum(self.sparsity + a * self.increment, self.max_sparsity)
        new_ppl = self._ppl(new)
        ppl_before = self.ppl
        rolled = self.steps in self.rollback_on
        if rolled:
            new_ppl = ppl_before * 1.5  # the rejected attempt's perplexity
            self.rollbacks += 1
        else:
            self.sparsity = new
            self.ppl = new_ppl
        g = self.global_sparsity
        acc = 0.8 - 0.5 * g - (0.1 if rolled else 0.0)
        info = {"ppl": new_ppl, "fact_acc": acc, "fact_nll": 1.0 + g, "fact_retention": 1.0 - g,
                "achieved_sparsity": g, "rolled_back": rolled, "rollbacks": self.rollbacks,
                "ppl_increase": new_ppl / ppl_before - 1.0, "allocation": self.sparsity.tolist()}
        terminated = g >= self.target_sparsity - 1e-9
        truncated = self.steps >= self.max_steps
        return self._obs(), -math.log(new_ppl / 10.0), terminated, truncated, info


class ScriptedBackend(ChatBackend):
    """In-process backend returning answers in order (an Exception is raised); records every prompt."""

    name = "scripted"

    def __init__(self, answers, default=None):
        super().__init__()
        self.answers = list(answers)
        self.default = default
        self.prompts: list[list[dict]] = []

    def complete(self, messages, *, schema_hint=None):
        self.prompts.append([dict(m) for m in messages])
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Exception):
            raise answer
        return answer


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def move(*units, rationale="r"):
    return json.dumps({"units": list(units), "rationale": rationale})


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
