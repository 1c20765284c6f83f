"""IterativePrune: raise the sparsity of chosen units one increment at a time, reverting harmful steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from .base import Z_CLIP, PruneEnvBase, check_whole, clip_observation
from .increments import depth_bins, propose_increments
from .plugins import observation_feature
from ..context import Metrics, PruningContext, profile_table
from .rewards import objectives, scalar_quality
from ..pruning.scoring import unit_wanda_percentile, zscore
from ..pruning.snapshot import RankedMasks
from ..validation import check_number

UNIT_FEATURES = 5  # z_wanda, z_grad, sparsity, depth, param_share
GLOBAL_FEATURES = 6  # global sparsity, target, budget left, log ppl ratio, fact acc drop, rollback rate
TARGET_TOL = 1e-9
REWARD_MODES = ("scalar", "vector")
UNMET_PENALTY = 20.0  # per unit of sparsity left unmet at truncation (v2's default; v0/v1 register 0)


@dataclass
class IterativeCheckpoint:
    """What `IterativePruneEnv.rollback` needs: masks (as zero counts), metrics, step and rollback counts."""

    steps: int
    target: float
    zeros: list[list[int]]
    nominal: list[float]
    metrics: Metrics
    quality: float
    objectives: np.ndarray
    s_wanda: list[float]
    rollbacks: int
    done: bool


class IterativePruneEnv(PruneEnvBase):
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

    With `extra_features=[names]` (`prune_env.register_observation_feature`) each unit's entries
    are followed by fn(env, unit) for each name: 5 + k entries per unit (per bin in v1), globals last.

    Entries are clipped to [-10, 10]. s_u rises as pruning removes a unit's weakest weights, so z_wanda
    tracks how much low-importance mass a unit has left.

    ## Rewards
    quality(m) = -ppl_weight * log(ppl / ppl_dense) - fact_weight * (fact_acc_dense - fact_acc)
    (`rewards.quality` against the dense metrics, weights 1 and 1 by default). An accepted step pays
    quality(new) - quality(previous accepted state); a step that changes nothing pays 0; a reverted
    step pays -rollback_penalty (default 0.1). quality(dense) = 0, so the undiscounted return of an
    episode telescopes to quality(final model) - rollback_penalty * rollbacks - unmet penalty.
    `shaping_weight` is not used by this environment.

    Unmet budget (v2; `unmet_penalty`, default 20, 0 in v0/v1): an episode truncated short of its target
    pays `unmet_penalty * (target - global sparsity)` at its last step (1.0 per missing 0.05 increment), so
    never pruning (-20 * target) and stopping early pay clearly more than pruning to the target costs;
    v0/v1 pay nothing for it and are won by never pruning (return 0). A penalty, not a terminal
    budget-match: a match would make stopping worth exactly a one-shot uniform prune, bypassing the
    rollback rule the loop is about. Measured once (v2, SmolLM2-135M, data={"eval_tokens": 1024,
    "n_facts": 32}, OMP_NUM_THREADS=1; docs/results/reference-scores/README.md): target 0.3: do-nothing
    -6.00, stop-early (half the target, then nothing) -3.04, uniform increments (all ones) -0.15 (on
    target in 6 steps); target 0.5: -10.00, -5.07, uniform increments -3.43 (all ones until the step
    0.35 -> 0.40 is reverted, ppl +12.5%, then nothing: repeating it is reverted every time).
    With `reward_mode="vector"` the reward is a numpy vector in `reward_space` (`Box(-inf, inf, (2 +
    n_terms,))`, as in LayerPrune): the change of the unweighted objectives [-log(ppl / ppl_dense),
    fact_acc - fact_acc_dense, term_1, ...]; the rollback and unmet penalties go to entry 0 (LayerPrune
    puts its shaping there), so `LinearizeReward(env, [1, 1, ...])` is the scalar reward when the
    weights are 1. `info["unmet_penalty"]` is the penalty paid at that step.

    `info` every step (and at reset): `ppl`, `fact_acc`, `fact_nll`, `fact_retention` of the current
    accepted state (after a rollback: the restored state), `quality`, `achieved_sparsity`, `allocation`
    (per-unit sparsity), `rolled_back`, `rollbacks` (count so far), `ppl_increase` (relative perplexity
    increase the step caused, also when it was reverted; 0 when nothing changed), `changed` (indices of
    the units whose masks the step changed; reverted again when `rolled_back`), `step`,
    `target_sparsity`. A non-finite perplexity always counts as above the threshold. At the episode's
    last step `normalised_score` is None: the reference table (`prune_env.envs.reference`) has no
    IterativePrune task yet.

    With `bins=K` (IterativePrune-v1, K = 8) the spaces no longer depend on the model: unit i belongs to
    depth bin floor(i * K / n) (a bin without units takes the unit nearest its centre); the observation
    holds the five entries per BIN (mean over its units; param_share summed) then the six globals,
    `Box(-10, 10, (5 * K + 6,))`, and the action is `MultiBinary(K)`: a 1 selects every unit of that
    bin. Bins keep the increment mechanics, rollback and budget scaling of v0 unchanged, and depth
    bins carry the profile's main signal (sensitivity varies smoothly with depth); `env.bin_units`
    lists each bin's units.

    ## Starting State
    The dense model (weights restored bit-exactly on every `reset`), all units at sparsity 0.
    `reset(options={"target_sparsity": x})` changes the target for that episode;
    `target_sparsity_range=(lo, hi)` (constructor or reset option) draws it from `self.np_random`
    instead, reproducibly for `reset(seed=s)`. The data is fixed by `data["seed"]`, not by `reset(seed)`.
    Model ownership as in LayerPrune-v0: the env owns its context unless `context=` lends one.

    ## Episode End
    Terminates when the global sparsity reaches the target (>= target - 1e-9). Truncates after
    `max_steps` steps (every step counts, also reverted and empty ones). Stepping a finished episode,
    or before `reset`, raises RuntimeError.

    ## Arguments
    Every keyword with its default and meaning: `IterativePruneEnv.__init__`'s Args.
    Registered with `max_episode_steps=100` (the default max_steps): with `gym.make(..., max_steps=N)`
    for N > 100 pass `max_episode_steps=N` too, or the TimeLimit wrapper truncates at 100.

    ## Example
    ```python
    import gymnasium as gym
    env = gym.make("prune_env:prune_env/IterativePrune-v2", model="tiny-llama", target_sparsity=0.3)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    ```

    ## Version History
    * v2: v1's spaces; a truncated episode pays `unmet_penalty` (20) per unit of sparsity left unmet, so
      never pruning no longer wins (v0/v1 return 0 for it). A new id, not a changed v1: Gymnasium bumps
      the version whenever returns change, and published v0/v1 numbers stay reproducible.
    * v1: fixed-size spaces (K = 8 depth bins), independent of the model's depth and family.
    * v0: initial version (observation 5n + 6, action MultiBinary(n)).

    For agents: `unit_names`, `profile_table()`, `global_sparsity`, `target_sparsity` (the episode's),
    `max_sparsity`, `increment`, `checkpoint()` / `rollback(cp)`.
    """

    def __init__(self, model: str = "smollm2-135m", target_sparsity: float = 0.5, granularity: str = "block",
                 method: str = "wanda", increment: float = 0.05, max_sparsity: float = 0.9,
                 rollback_threshold: float = 0.10, max_steps: int = 100, reward: dict | None = None,
                 data: dict | None = None, device: str = "cpu", dtype: str = "float32",
                 render_mode: str | None = None, context: PruningContext | None = None,
                 target_sparsity_range: tuple[float, float] | None = None, bins: int | None = None,
                 extra_features: list[str] | None = None, unmet_penalty: float = UNMET_PENALTY,
                 reward_mode: str = "scalar", **kwargs):
        """Builds the env's own model context (or borrows `context`), the score ranks and the spaces.

        Args:
            model: a model alias ("smollm2-135m", "tiny-llama" ...), a folder, a .gguf file or a hub id.
            target_sparsity: the global sparsity an episode ends on (until reset options change it).
            granularity: "block" (one unit per decoder block) or "linear" (one unit per linear layer).
            method: "wanda", "magnitude" or "sparsegpt" (ranked as Wanda): how masks are ranked.
            increment: the sparsity a selected unit gains per step.
            max_sparsity: each unit's cap (also the highest reachable target).
            rollback_threshold: the relative perplexity rise above which a step is reverted (math.inf: never).
            max_steps: steps before truncation (pass `max_episode_steps` too above 100 through gym.make).
            reward: RewardConfig values (ppl_weight, fact_weight, rollback_penalty, terms ...); None: defaults.
            data: DataConfig values (text, facts, slice sizes, seed ...); None: defaults.
            device: where the model runs ("cpu", "cuda", ...).
            dtype: the model's weights' dtype ("float32", "bfloat16", ...).
            render_mode: None, "ansi" or "rgb_array".
            context: None (the env builds and owns its model) or a lent PruningContext.
            target_sparsity_range: None or (lo, hi): each reset draws the target from it with `np_random`.
            bins: None (v0: one action per unit) or K depth bins (v1, v2: 8).
            extra_features: names of registered observation features appended to each unit's entries.
            unmet_penalty: paid per unit of sparsity left unmet at truncation (v2: 20; v0/v1: 0).
            reward_mode: "scalar" or "vector" (the objectives' changes in `reward_space`).

        Raises:
            ValueError: an unknown keyword or an invalid value, named with its fix, before any model loads.
        """
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"unknown reward_mode {reward_mode!r}: use one of {', '.join(REWARD_MODES)}")
        self.reward_mode = reward_mode
        self.unmet_penalty = float(check_number("unmet_penalty", unmet_penalty, low=0.0))
        max_sparsity = float(check_number("max_sparsity", max_sparsity, low=0.0, high=1.0, low_open=True,
                                          high_open=True))
        increment = float(check_number("increment", increment, low=0.0, high=1.0, low_open=True, high_open=True))
        self.rollback_threshold = float(check_number("rollback_threshold", rollback_threshold, low=0.0)
                                        if rollback_threshold != math.inf else math.inf)
        self.max_steps = check_whole("max_steps", max_steps, 1)
        self._max_sparsity, self._increment = max_sparsity, increment
        self._setup(unknown=kwargs, target_sparsity=target_sparsity, target_sparsity_range=target_sparsity_range,
                    target_bounds=(0.0, max_sparsity), render_mode=render_mode, reward=reward, context=context,
                    context_args=dict(model=model, device=device, dtype=dtype, granularity=granularity,
                                      method=method, data=data))
        self._reference = self.context.dense
        # ranks live on the CPU (they are as large as the model); each mask moves to the weight's device
        self._ranks = RankedMasks({name: w.cpu() for name, w in self.context.masked.dense.items()}, self.context.method,
                                  {name: a.cpu() for name, a in self.context.stats.act_norm.items()})
        n = len(self.units)
        self.extra_features = list(extra_features or [])
        self._features = [observation_feature(name) for name in self.extra_features]
        self.bins = None if bins is None else check_whole("bins", bins, 1)
        self.bin_units = depth_bins(n, self.bins) if self.bins else [[i] for i in range(n)]
        width = len(self.bin_units)
        self.action_space = spaces.MultiBinary(width)
        per_unit = UNIT_FEATURES + len(self._features)
        self.observation_space = spaces.Box(-Z_CLIP, Z_CLIP, (per_unit * width + GLOBAL_FEATURES,),
                                            dtype=np.float32)
        self.reward_space = spaces.Box(-np.inf, np.inf, (len(self.reward_config.names()),), dtype=np.float64)
        self._steps: int | None = None  # None: reset() not called yet
        self._zeros = [[0] * len(unit.linears) for unit in self.units]
        self._nominal = [0.0] * n
        self._metrics = self.context.dense
        self._quality, self._objectives = 0.0, np.zeros(self.reward_space.shape)
        self._s_wanda = list(self.context.dense_wanda)
        self._z_wanda = list(self.context.z_wanda)
        self._rollbacks, self._done = 0, False

    # -- Gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._reset_target(seed, options)
        self.context.restore()
        self._steps, self._rollbacks, self._done = 0, 0, False
        self._zeros = [[0] * len(unit.linears) for unit in self.units]
        self._nominal = [0.0] * len(self.units)
        self._metrics = self.context.dense
        self._quality, self._objectives = self._quality_of(self._metrics)
        self._s_wanda = list(self.context.dense_wanda)
        self._z_wanda = zscore(self._s_wanda)
        return self._observation(), self._info(rolled_back=False, increase=0.0, changed=[], unmet=0.0)

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
        rolled_back, increase, scalar = False, 0.0, 0.0
        vector = np.zeros(self.reward_space.shape, dtype=np.float64)  # penalties go to entry 0, as in LayerPrune
        if changed:
            self._apply({u: proposal[u] for u in changed})
            metrics = self.context.evaluate()
            increase = metrics.ppl / self._metrics.ppl - 1.0
            if not math.isfinite(metrics.ppl) or not increase <= self.rollback_threshold:
                self._apply({u: self._zeros[u] for u in changed})
                self._rollbacks += 1
                rolled_back, scalar = True, -self.reward_config.rollback_penalty
                vector[0] = scalar
            else:
                for u in changed:
                    self._zeros[u], self._nominal[u] = list(proposal[u]), nominal[u]
                    self._s_wanda[u] = unit_wanda_percentile(self.units[u].linears, self.context.stats.act_norm)
                self._z_wanda = zscore(self._s_wanda)
                new_quality, new_objectives = self._quality_of(metrics)
                vector += new_objectives - self._objectives
                scalar = new_quality - self._quality  # exactly the scalar quality's change (no re-weighting)
                self._metrics, self._quality, self._objectives = metrics, new_quality, new_objectives
        terminated = self._pruned() >= self._needed()
        truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        unmet = self.unmet_penalty * max(0.0, self.target_sparsity - self.global_sparsity) if truncated else 0.0
        vector[0] -= unmet
        reward = vector if self.reward_mode == "vector" else float(scalar - unmet)
        info = self._info(rolled_back=rolled_back, increase=float(increase), changed=changed, unmet=unmet)
        if self._done:
            info["normalised_score"] = None  # no IterativePrune task in prune_env/envs/reference_scores.json
        return self._observation(), reward, terminated, truncated, info

    # -- checkpoint / rollback ---------------------------------------------------------------------
    def checkpoint(self) -> IterativeCheckpoint:
        if self._steps is None:
            raise RuntimeError("call reset() before checkpoint()")
        return IterativeCheckpoint(self._steps, self.target_sparsity, [list(z) for z in self._zeros],
                                   list(self._nominal), self._metrics, self._quality, self._objectives.copy(),
                                   list(self._s_wanda), self._rollbacks, self._done)

    def rollback(self, checkpoint: IterativeCheckpoint) -> None:
        """Return to `checkpoint`: masks, weights (bit-exactly), metrics, step count and rollback count."""
        if self._steps is None:
            raise RuntimeError("call reset() before rollback()")
        self._apply({u: zeros for u, zeros in enumerate(checkpoint.zeros) if zeros != self._zeros[u]})
        self._steps, self.target_sparsity = checkpoint.steps, checkpoint.target
        self._zeros = [list(z) for z in checkpoint.zeros]
        self._nominal = list(checkpoint.nominal)
        self._metrics, self._quality = checkpoint.metrics, checkpoint.quality
        self._objectives = checkpoint.objectives.copy()
        self._s_wanda = list(checkpoint.s_wanda)
        self._z_wanda = zscore(self._s_wanda)
        self._rollbacks, self._done = checkpoint.rollbacks, checkpoint.done

    # -- helpers for agents ------------------------------------------------------------------------
    def profile_table(self) -> list[dict]:
        """One row per unit: unit, index, z_wanda (live weights), z_grad (dense), sparsity, param_share."""
        return profile_table(self.context, z_wanda=self._z_wanda, sparsity=self._allocation())

    @property
    def global_sparsity(self) -> float:
        return self._pruned() / self.context.total_numel

    @property
    def max_sparsity(self) -> float:
        return self._max_sparsity

    @property
    def increment(self) -> float:
        return self._increment

    # -- internals ---------------------------------------------------------------------------------
    def _selection(self, action) -> np.ndarray:
        n = self.action_space.n
        expected = f"{self.action_space} (shape ({n},), each value 0 or 1)"
        values = np.asarray(action)
        if values.dtype.kind not in "biuf":
            raise ValueError(f"action {action!r} is not in {expected}: its entries are {values.dtype}, not numbers")
        if values.shape != (n,):
            raise ValueError(f"action of shape {values.shape} is not in {expected}")
        values = values.astype(np.float64)
        if np.isnan(values).any():
            raise ValueError(f"action {values.tolist()} is not in {expected}: it contains NaN")
        if not np.isin(values, (0.0, 1.0)).all():
            bad = sorted({float(v) for v in values if v not in (0.0, 1.0)})
            raise ValueError(f"action {values.tolist()} is not in {expected}: {bad} are not 0 or 1")
        selected = np.zeros(len(self.units), dtype=bool)
        for chosen, members in zip(values == 1.0, self.bin_units):
            selected[members] |= chosen
        return selected

    def _needed(self) -> int:
        """The fewest pruned weights whose global sparsity is >= target - 1e-9."""
        return math.ceil((self.target_sparsity - TARGET_TOL) * self.context.total_numel)

    def _pruned(self) -> int:
        return sum(sum(z) for z in self._zeros)

    def _propose(self, selected: np.ndarray) -> tuple[list[list[int]], list[float]]:
        """Per-linear zero counts and nominal ratios after this step's increments (scaled at the target)."""
        return propose_increments(self._zeros, self._nominal, np.flatnonzero(selected).tolist(), self.units,
                                  self._increment, self._max_sparsity, self._needed() - self._pruned())

    def _apply(self, zeros_by_unit: dict[int, list[int]]) -> None:
        """Set the masks of these units to the given per-linear zero counts (0: dense weights back)."""
        for u, zeros in zeros_by_unit.items():
            for ref, count in zip(self.units[u].linears, zeros):
                self._ranks.apply(self.context.masked, ref.name, count / ref.numel)

    def _allocation(self) -> list[float]:
        return [sum(z) / unit.numel for z, unit in zip(self._zeros, self.units)]

    def _quality_of(self, metrics: Metrics) -> tuple[float, np.ndarray]:
        """The scalar quality and the unweighted objectives of a state (both 0 for the dense model)."""
        state = {**metrics.as_dict(), "achieved_sparsity": self.global_sparsity}
        allocation, config = self._allocation(), self.reward_config
        return scalar_quality(state, allocation, self, config), objectives(state, allocation, self, config)

    def _render_z_wanda(self) -> list[float]:
        return list(self._z_wanda)

    def _info(self, rolled_back: bool, increase: float, changed: list[int], unmet: float) -> dict:
        return {**self._metrics.as_dict(), "quality": self._quality, "achieved_sparsity": self.global_sparsity,
                "allocation": self._allocation(), "rolled_back": rolled_back, "rollbacks": self._rollbacks,
                "ppl_increase": increase, "changed": list(changed), "step": self._steps,
                "target_sparsity": self.target_sparsity, "unmet_penalty": unmet}

    def _observation(self) -> np.ndarray:
        n, total = len(self.units), self.context.total_numel
        allocation = self._allocation()
        rows = [[self._z_wanda[i], self.context.z_grad[i], allocation[i], i / max(n - 1, 1), unit.numel / total,
                 *(float(check_number(f"observation feature {name!r}", feature(self, i)))
                   for name, feature in zip(self.extra_features, self._features))]
                for i, unit in enumerate(self.units)]
        obs = []
        for members in self.bin_units:  # v0: one unit per entry; v1: the mean over the bin (param_share: its sum)
            mean = np.mean([rows[i] for i in members], axis=0).tolist()
            obs += [*mean[:4], sum(rows[i][4] for i in members), *mean[5:]]
        dense = self.context.dense
        log_ratio = math.log(self._metrics.ppl / dense.ppl) if self._metrics.ppl > 0 else Z_CLIP
        glob = self.global_sparsity
        target = self.target_sparsity
        obs += [glob, target, target - glob, log_ratio, dense.fact_acc - self._metrics.fact_acc,
                self._rollbacks / self.max_steps]
        return clip_observation(obs)
