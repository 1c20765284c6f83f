"""IterativePrune-v0: raise the sparsity of chosen units one increment at a time, reverting harmful steps."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .context import DataConfig, Metrics, PruningContext
from .env import Z_CLIP, _options, check_target, is_number, reset_target
from .masking import RankedMasks
from .rendering import render_allocation
from .rewards import RewardConfig, quality
from .scoring import unit_wanda_percentile, zscore

UNIT_FEATURES = 5  # z_wanda, z_grad, sparsity, depth, param_share
GLOBAL_FEATURES = 6  # global sparsity, target, budget left, log ppl ratio, fact acc drop, rollback rate
TARGET_TOL = 1e-9


def _apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split `total` whole weights in proportion to `weights`, none above its cap (largest remainder).

    Each share is within one of its exact proportional value unless a cap binds; needs sum(caps) >= total.
    """
    n = len(weights)
    wsum = float(sum(weights))
    shares = [total * w / wsum for w in weights] if wsum > 0 else [0.0] * n
    out = [min(int(math.floor(s)), c) for s, c in zip(shares, caps)]
    left = total - sum(out)
    order = sorted(range(n), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    while left > 0:
        progressed = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise AssertionError(f"cannot apportion {total} over caps {caps}")  # callers guarantee capacity
    return out


@dataclass
class _Checkpoint:
    steps: int
    target: float
    zeros: list[list[int]]
    nominal: list[float]
    metrics: Metrics
    quality: float
    s_wanda: list[float]
    rollbacks: int
    done: bool


class IterativePruneEnv(gym.Env):
    """
    ## Description
    The iterative pruning loop of arXiv 2601.09694 on a real Hugging Face causal LM. A unit is a decoder
    block, or one linear layer with `granularity="linear"`. Each step the agent names the units that get
    one more `increment` of sparsity; the new masks are applied at once and the model is evaluated
    exactly on the context's evaluation slices (real perplexity and factual-QA accuracy). A step that
    raises perplexity by more than `rollback_threshold` (relative, ppl_new / ppl_prev - 1) is reverted.

    Masks come from `RankedMasks`: score ranks precomputed once on the dense weights with the dense
    calibration activation norms (`ctx.stats.act_norm`), so a mask at any ratio is one comparison and
    the masks of one unit are nested as its ratio grows (no sequential recalibration). `method="wanda"`
    ranks |W| * ||X||_2 within each output row, `"magnitude"` ranks |W| over the whole matrix, and
    `"sparsegpt"` falls back to the Wanda ranks (its weight reconstruction cannot be precomputed, so
    no weights are updated).

    ## Action Space
    `MultiBinary(n_units)`: a 1 adds `increment` to that unit's sparsity ratio, capped at
    `max_sparsity`; within a block every linear gets the same ratio (exact weight counts,
    round(ratio * numel) per matrix). If the selected increments would push the parameter-weighted
    global sparsity past the episode's target, this step's increments are scaled down uniformly so
    the global sparsity lands exactly on the target: the smallest whole number of pruned weights
    with sparsity >= target - 1e-9, each unit within one weight of its exact scaled share. A step that
    selects nothing, or only capped units, changes nothing (reward 0, `info["changed"] == []`).
    Anything outside the space (wrong shape, values other than 0/1, NaN) raises ValueError.

    ## Observation Space
    `Box(-10, 10, (5 * n_units + 6,), float32)`: five entries per unit, unit by unit (entry j of unit i
    at index 5 * i + j), then six global entries (G = 5 * n_units):

    | index | entry | definition |
    |-------|-------|------------|
    | 5i + 0 | z_wanda | z-score across units of s_u, the 10th percentile of the unit's non-zero Wanda scores |W|*||X||_2 of its CURRENT live weights (recomputed after each accepted step) |
    | 5i + 1 | z_grad | z-score across units of the mean |dL/dW| (dense model, `grad_samples` calibration sequences) |
    | 5i + 2 | sparsity | the unit's current sparsity (pruned weights / unit weights) |
    | 5i + 3 | depth | unit index / (n_units - 1) |
    | 5i + 4 | param_share | unit weights / all prunable weights |
    | G + 0 | global | parameter-weighted sparsity of all prunable weights |
    | G + 1 | target | the episode's target sparsity |
    | G + 2 | budget_left | target - global |
    | G + 3 | log_ppl_ratio | log(ppl / ppl_dense) of the current accepted state |
    | G + 4 | fact_drop | fact_acc_dense - fact_acc of the current accepted state |
    | G + 5 | rollback_rate | rollbacks so far / max_steps |

    Entries are clipped to [-10, 10]. s_u rises as pruning removes a unit's weakest weights, so z_wanda
    tracks how much low-importance mass a unit has left.

    ## Rewards
    quality(m) = -ppl_weight * log(ppl / ppl_dense) - fact_weight * (fact_acc_dense - fact_acc)
    (`rewards.quality` against the dense metrics, weights 1 and 1 by default). An accepted step pays
    quality(new) - quality(previous accepted state); a step that changes nothing pays 0; a reverted
    step pays -rollback_penalty (default 0.1). quality(dense) = 0, so the undiscounted return of an
    episode telescopes to quality(final model) - rollback_penalty * rollbacks. `shaping_weight` is
    not used by this environment.

    `info` every step (and at reset): `ppl`, `fact_acc`, `fact_nll`, `fact_retention` of the current
    accepted state (after a rollback: the restored state), `quality`, `achieved_sparsity`, `allocation`
    (per-unit sparsity), `rolled_back`, `rollbacks` (count so far), `ppl_increase` (relative perplexity
    increase the step caused, also when it was reverted; 0 when nothing changed), `changed` (indices of
    the units whose masks the step changed; reverted again when `rolled_back`), `step`,
    `target_sparsity`. A non-finite perplexity always counts as above the threshold.

    ## Starting State
    The dense model (weights restored bit-exactly on every `reset`), all units at sparsity 0.
    `reset(options={"target_sparsity": x})` changes the target for that episode.

    ## Episode End
    Terminates when the global sparsity reaches the target (>= target - 1e-9). Truncates after
    `max_steps` steps (every step counts, also reverted and empty ones). Stepping a finished episode,
    or before `reset`, raises RuntimeError.

    ## Arguments
    model ("smollm2-135m"), target_sparsity (0.5), granularity ("block" | "linear"), method ("wanda" |
    "magnitude" | "sparsegpt"), increment (0.05), max_sparsity (0.9, per-unit cap), rollback_threshold
    (0.10; math.inf never reverts), max_steps (100), reward (dict of RewardConfig, incl.
    rollback_penalty), data (dict of DataConfig), device ("cpu"), dtype ("float32"), render_mode
    (None | "ansi" | "rgb_array").

    For agents: `unit_names`, `profile_table()`, `global_sparsity`, `target_sparsity` (the episode's),
    `max_sparsity`, `increment`, `checkpoint()` / `rollback(cp)`.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, model: str = "smollm2-135m", target_sparsity: float = 0.5, granularity: str = "block",
                 method: str = "wanda", increment: float = 0.05, max_sparsity: float = 0.9,
                 rollback_threshold: float = 0.10, max_steps: int = 100, reward: dict | None = None,
                 data: dict | None = None, device: str = "cpu", dtype: str = "float32",
                 render_mode: str | None = None, context: PruningContext | None = None, **kwargs):
        _options(type(self), kwargs)
        check_target(target_sparsity)
        if not is_number(max_sparsity) or not target_sparsity <= max_sparsity < 1.0:
            raise ValueError(f"need target_sparsity <= max_sparsity < 1, got target={target_sparsity} "
                             f"max_sparsity={max_sparsity!r}: no unit could go high enough")
        if not is_number(increment) or not 0.0 < increment < 1.0:
            raise ValueError(f"increment {increment!r} must be in (0, 1): the sparsity added per selected unit "
                             f"and step, e.g. 0.05")
        if not is_number(rollback_threshold) or rollback_threshold < 0:
            raise ValueError(f"rollback_threshold {rollback_threshold!r} must be >= 0 (relative perplexity "
                             f"increase of one step, e.g. 0.10; math.inf never reverts)")
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
            raise ValueError(f"max_steps {max_steps!r} must be an integer >= 1")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}: use 'ansi' or 'rgb_array'")
        self._default_target, self._max_sparsity = float(target_sparsity), float(max_sparsity)
        self._increment, self.rollback_threshold = float(increment), float(rollback_threshold)
        self.max_steps, self.render_mode = int(max_steps), render_mode
        self.reward_config = RewardConfig.from_dict(reward)
        self.context = context or PruningContext(model, device=device, dtype=dtype, granularity=granularity,
                                                 method=method, data=DataConfig.from_dict(data))
        self.units = self.context.units
        self.unit_names = [unit.name for unit in self.units]
        # ranks live on the CPU (they are as large as the model); each mask moves to the weight's device
        self._ranks = RankedMasks({name: w.cpu() for name, w in self.context.masked.dense.items()}, self.context.method,
                                  {name: a.cpu() for name, a in self.context.stats.act_norm.items()})
        n = len(self.units)
        self.action_space = spaces.MultiBinary(n)
        self.observation_space = spaces.Box(-Z_CLIP, Z_CLIP, (UNIT_FEATURES * n + GLOBAL_FEATURES,),
                                            dtype=np.float32)
        self._steps: int | None = None  # None: reset() not called yet
        self._target = self._default_target
        self._zeros = [[0] * len(unit.linears) for unit in self.units]
        self._nominal = [0.0] * n
        self._metrics = self.context.dense
        self._quality = 0.0
        self._s_wanda = list(self.context.dense_wanda)
        self._z_wanda = list(self.context.z_wanda)
        self._rollbacks, self._done = 0, False

    # -- Gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        target = reset_target(options, self._default_target)
        if target > self._max_sparsity:
            raise ValueError(f"target_sparsity {target} is above max_sparsity {self._max_sparsity}: "
                             f"no allocation can reach it")
        self._target = target
        self.context.restore()
        self._steps, self._rollbacks, self._done = 0, 0, False
        self._zeros = [[0] * len(unit.linears) for unit in self.units]
        self._nominal = [0.0] * len(self.units)
        self._metrics = self.context.dense
        self._quality = self._quality_of(self._metrics)
        self._s_wanda = list(self.context.dense_wanda)
        self._z_wanda = zscore(self._s_wanda)
        return self._observation(), self._info(rolled_back=False, increase=0.0, changed=[])

    @torch.no_grad()
    def step(self, action):
        if self._steps is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended: call reset() before stepping again")
        selected = self._selection(action)
        self._steps += 1
        proposal, nominal = self._propose(selected)
        changed = [u for u in range(len(self.units)) if proposal[u] != self._zeros[u]]
        rolled_back, increase, reward = False, 0.0, 0.0
        if changed:
            self._apply({u: proposal[u] for u in changed})
            metrics = self.context.evaluate()
            increase = metrics.ppl / self._metrics.ppl - 1.0
            if not math.isfinite(metrics.ppl) or not increase <= self.rollback_threshold:
                self._apply({u: self._zeros[u] for u in changed})
                self._rollbacks += 1
                rolled_back, reward = True, -self.reward_config.rollback_penalty
            else:
                for u in changed:
                    self._zeros[u], self._nominal[u] = list(proposal[u]), nominal[u]
                    self._s_wanda[u] = unit_wanda_percentile(self.units[u].linears, self.context.stats.act_norm)
                self._z_wanda = zscore(self._s_wanda)
                new_quality = self._quality_of(metrics)
                reward = new_quality - self._quality
                self._metrics, self._quality = metrics, new_quality
        terminated = self._pruned() >= self._needed()
        truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        info = self._info(rolled_back=rolled_back, increase=float(increase), changed=changed)
        return self._observation(), float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode: pass render_mode='ansi' or 'rgb_array'")
            return None
        return render_allocation(self.unit_names, self._allocation(), self._z_wanda, self.context.z_grad,
                                 self._target, self.render_mode)

    def close(self):
        self.context.restore()

    # -- checkpoint / rollback ---------------------------------------------------------------------
    def checkpoint(self) -> _Checkpoint:
        if self._steps is None:
            raise RuntimeError("call reset() before checkpoint()")
        return _Checkpoint(self._steps, self._target, [list(z) for z in self._zeros], list(self._nominal),
                           self._metrics, self._quality, list(self._s_wanda), self._rollbacks, self._done)

    def rollback(self, checkpoint: _Checkpoint) -> None:
        """Return to `checkpoint`: masks, weights (bit-exactly), metrics, step count and rollback count."""
        if self._steps is None:
            raise RuntimeError("call reset() before rollback()")
        self._apply({u: zeros for u, zeros in enumerate(checkpoint.zeros) if zeros != self._zeros[u]})
        self._steps, self._target = checkpoint.steps, checkpoint.target
        self._zeros = [list(z) for z in checkpoint.zeros]
        self._nominal = list(checkpoint.nominal)
        self._metrics, self._quality = checkpoint.metrics, checkpoint.quality
        self._s_wanda = list(checkpoint.s_wanda)
        self._z_wanda = zscore(self._s_wanda)
        self._rollbacks, self._done = checkpoint.rollbacks, checkpoint.done

    # -- helpers for agents ------------------------------------------------------------------------
    def profile_table(self) -> list[dict]:
        """One row per unit: unit, index, z_wanda (live weights), z_grad (dense), sparsity, param_share."""
        allocation = self._allocation()
        return [{"unit": unit.name, "index": i, "z_wanda": float(self._z_wanda[i]),
                 "z_grad": float(self.context.z_grad[i]), "sparsity": allocation[i],
                 "param_share": unit.numel / self.context.total_numel} for i, unit in enumerate(self.units)]

    @property
    def global_sparsity(self) -> float:
        return self._pruned() / self.context.total_numel

    @property
    def target_sparsity(self) -> float:
        """The current episode's target (the constructor's until reset(options=...) changes it)."""
        return self._target

    @property
    def episode_target(self) -> float:
        return self._target

    @property
    def max_sparsity(self) -> float:
        return self._max_sparsity

    @property
    def increment(self) -> float:
        return self._increment

    # -- internals ---------------------------------------------------------------------------------
    def _selection(self, action) -> np.ndarray:
        n = len(self.units)
        expected = f"{self.action_space} (shape ({n},), each value 0 or 1)"
        try:
            values = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"action {action!r} is not in {expected}") from None
        if values.shape != (n,):
            raise ValueError(f"action of shape {values.shape} is not in {expected}")
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"action {values.tolist()} is not in {expected}: values must be 0 or 1, not NaN")
        return values == 1.0

    def _needed(self) -> int:
        """The fewest pruned weights whose global sparsity is >= target - 1e-9."""
        return math.ceil((self._target - TARGET_TOL) * self.context.total_numel)

    def _pruned(self) -> int:
        return sum(sum(z) for z in self._zeros)

    def _propose(self, selected: np.ndarray) -> tuple[list[list[int]], list[float]]:
        """Per-linear zero counts and nominal ratios after this step's increments (scaled at the target)."""
        proposal, nominal = [list(z) for z in self._zeros], list(self._nominal)
        grow = [u for u in np.flatnonzero(selected).tolist() if self._nominal[u] < self._max_sparsity - 1e-12]
        for u in grow:
            nominal[u] = min(self._nominal[u] + self._increment, self._max_sparsity)
            proposal[u] = [max(old, round(nominal[u] * ref.numel))
                           for old, ref in zip(self._zeros[u], self.units[u].linears)]
        pruned = self._pruned()
        budget = self._needed() - pruned
        added = sum(sum(proposal[u]) for u in grow) - sum(sum(self._zeros[u]) for u in grow)
        if added <= budget:
            return proposal, nominal
        # uniform down-scaling: every unit gets the same fraction of its requested increment
        requested = [(nominal[u] - self._nominal[u]) * self.units[u].numel for u in grow]
        caps = [sum(proposal[u]) - sum(self._zeros[u]) for u in grow]
        shares = _apportion(budget, requested, caps)
        fraction = budget / sum(requested)
        for u, share in zip(grow, shares):
            refs = self.units[u].linears
            lin_caps = [new - old for new, old in zip(proposal[u], self._zeros[u])]
            extra = _apportion(share, [ref.numel for ref in refs], lin_caps)
            proposal[u] = [old + e for old, e in zip(self._zeros[u], extra)]
            nominal[u] = self._nominal[u] + fraction * (nominal[u] - self._nominal[u])
        return proposal, nominal

    def _apply(self, zeros_by_unit: dict[int, list[int]]) -> None:
        """Set the masks of these units to the given per-linear zero counts (0: dense weights back)."""
        masked = self.context.masked
        for u, zeros in zeros_by_unit.items():
            for ref, count in zip(self.units[u].linears, zeros):
                if count == 0:
                    masked.restore([ref.name])
                else:
                    keep = self._ranks.keep(ref.name, count / ref.numel)
                    masked.apply(ref.name, keep.to(ref.module.weight.device))

    def _allocation(self) -> list[float]:
        return [sum(z) / unit.numel for z, unit in zip(self._zeros, self.units)]

    def _quality_of(self, metrics: Metrics) -> float:
        dense = self.context.dense
        return quality(metrics.ppl, metrics.fact_acc, dense.ppl, dense.fact_acc, self.reward_config)

    def _info(self, rolled_back: bool, increase: float, changed: list[int]) -> dict:
        return {**self._metrics.as_dict(), "quality": self._quality, "achieved_sparsity": self.global_sparsity,
                "allocation": self._allocation(), "rolled_back": rolled_back, "rollbacks": self._rollbacks,
                "ppl_increase": increase, "changed": list(changed), "step": self._steps,
                "target_sparsity": self._target}

    def _observation(self) -> np.ndarray:
        n, total = len(self.units), self.context.total_numel
        allocation = self._allocation()
        obs = []
        for i, unit in enumerate(self.units):
            obs += [self._z_wanda[i], self.context.z_grad[i], allocation[i], i / max(n - 1, 1), unit.numel / total]
        dense = self.context.dense
        log_ratio = math.log(self._metrics.ppl / dense.ppl) if self._metrics.ppl > 0 else Z_CLIP
        glob = self.global_sparsity
        obs += [glob, self._target, self._target - glob, log_ratio, dense.fact_acc - self._metrics.fact_acc,
                self._rollbacks / self.max_steps]
        return np.clip(np.nan_to_num(np.asarray(obs, dtype=np.float64), nan=Z_CLIP, posinf=Z_CLIP,
                                     neginf=-Z_CLIP), -Z_CLIP, Z_CLIP).astype(np.float32)
