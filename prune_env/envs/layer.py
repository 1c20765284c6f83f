"""LayerPrune-v0 / -v1: choose the sparsity of each pruning unit of a real causal LM, one unit per step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from . import reference
from ..pruning.allocation_files import project, wall_bounds
from .base import RESET_OPTIONS, PruneEnvBase, check_whole
from ..context import PruningContext
from .fidelities import FIDELITIES, SurrogateContext, make_fidelity
from .observation import KIND_ENCODINGS, UnitObservation
from .rewards import (check_knowledge_reference, check_preference_range, draw_preference, objectives,
                      preference_configs, preference_quality, scalar_quality)
from ..validation import check_flag, check_number, check_ratio

ACTION_TYPES = ("continuous", "discrete")
ACTION_MODES = ("absolute", "budget")
REWARD_MODES = ("scalar", "vector")


@dataclass
class LayerCheckpoint:
    """What `LayerPruneEnv.rollback` needs: the episode's bookkeeping and the fidelity's own state."""

    step: int
    ratios: list[float]
    zeros: list[int]
    prev_action: float
    last_drop: float
    fidelity: object  # what the fidelity needs to come back (exact: replay states and block statistics)


class LayerPruneEnv(PruneEnvBase):
    """
    ## Description
    Prunes a real Hugging Face causal LM, one unit at a time in model order (a unit is a decoder block,
    or one linear layer with `granularity="linear"`). Each step sets the sparsity of the next unit; the
    unit is pruned at once with the chosen operator (Wanda by default), calibrated on the outputs of the
    already pruned prefix, exactly as Wanda/SparseGPT prune block by block. At the end the pruned model's
    perplexity and factual-QA accuracy are measured against the dense model's.

    ## Action Space
    `Box(0, 1, (1,), float32)`: a in [0, 1] (clipped to it, like other Box envs; NaN and inf are refused)
    maps to the ratio min_sparsity + a * (max_sparsity - min_sparsity), which is then projected into the
    interval that still lets the remaining units meet the target exactly (AMC's action wall). With `action_type="discrete"`: `Discrete(n_actions)`, the
    index into an even grid of ratios from min_sparsity to max_sparsity, projected the same way.
    The parameter-weighted sparsity at the end equals `target_sparsity` within one weight per unit.
    With `action_mode="budget"` (continuous only) a asks for 2 * a * budget_left instead (clipped to
    [min_sparsity, max_sparsity], then the wall): a = 0.5 (0 after `make_env`'s [-1, 1] rescaling)
    continues uniformly at every target, so a policy trained over `target_sparsity_range` starts from
    uniform pruning at each target and learns deviations from it (AMC bounds actions around the budget).

    ## Observation Space
    `Box(-10, 10, (9 + k,), float32)` for the unit about to be decided (k = number of linear kinds, e.g.
    7 for Llama, with `granularity="linear"`, else 0):

    | index | entry | definition |
    |-------|-------|------------|
    | 0 | z_wanda | z-score across units of s_u, the 10th percentile of the unit's non-zero Wanda scores |W|*||X||_2 (dense model, calibration slice) |
    | 1 | z_grad | z-score across units of the mean |dL/dW| over `grad_samples` calibration sequences |
    | 2 | sparsity | the unit's current sparsity (0 until decided) |
    | 3 | depth | unit index / (n_units - 1) |
    | 4 | param_share | unit parameters / all prunable parameters |
    | 5 | achieved | parameter-weighted sparsity of the units decided so far, over all prunable parameters |
    | 6 | budget_left | sparsity the remaining units (this one included) must average to reach the target |
    | 7 | prev_action | the ratio applied at the previous step (0 at the start) |
    | 8 | last_drop | exact: relative L2 error of the last pruned block's output vs the dense block's, on one calibration batch; proxy: 0 |
    | 9.. | kind one-hot | with `granularity="linear"`: v0 one-hot of the linear type (q/k/v/o/gate/up/down..., k depends on the family); v1 (`kind_encoding="role"`) one-hot of the fixed roles attention_in / attention_out / mlp_in / mlp_out / other (k = 5 for every family) |
    | 9 + k | preference | with `preference_range`: the episode's preference w in [0, 1] (see Rewards) |
    | .. | extra features | one entry per name in `extra_features` (`prune_env.register_observation_feature`) |

    z-scores are clipped to [-10, 10]. `observe_profile=False` reads 0 in entries 0-1 (like MuJoCo's
    `exclude_current_positions_from_observation`): a policy trained on one calibration sees the same
    profile in every episode, so those entries only name the layer (as depth does) and shift on new text.

    ## Rewards
    Terminal: quality = -ppl_weight * log(ppl / ppl_dense) - fact_weight * (fact_acc_dense - fact_acc)
    (defaults 1 and 1), plus sum_k w_k * term_k(metrics, allocation, env) for `reward={"terms": {name: w_k}}`
    (terms registered with `prune_env.envs.plugins.register_reward_term`; they read the allocation, not the
    weights, so they are right on every fidelity). Optional shaping each step: -shaping_weight * last_drop
    (default 0). With `reward_mode="vector"` the reward is a numpy vector in `reward_space`
    (`Box(-inf, inf, (2 + n_terms,))`, one more with knowledge; MO-Gymnasium's convention):
    [-log(ppl / ppl_dense), fact_acc - fact_acc_dense, (knowledge,) term_1, ...] unweighted at the last step,
    the shaping term in entry 0 before (through wrappers: `env.get_wrapper_attr("reward_space")`);
    `prune_env.envs.wrappers.LinearizeReward(env, weights)` scalarises it (weights [ppl_weight,
    fact_weight, *term weights] give the scalar mode's reward). `info["quality"]` is always the scalar.
    `info` carries `ppl`, `fact_acc`, `fact_nll`, `fact_retention`, `achieved_sparsity`, `allocation`
    (per-unit ratios), `quality` at the end, and `ratio`, `achieved_sparsity`, `target_sparsity` every step.
    `env.unwrapped.reference` holds the dense metrics the reward compares with; `env.unwrapped.profile`
    the dense sensitivity profile (z_wanda, z_grad, numel per unit).

    Preference conditioning (`preference_range=(lo, hi)`, MO-Gymnasium style): each reset draws w from it
    with `np_random` after the target (`reset(options={"preference": w})` fixes w in [0, 1]); w is observed
    (index 9 + k), in `info["preference"]`, and the terminal reward is (1 - w) * -log(ppl / ppl_dense)
    + w * (fact_retention_balanced - 1) + user terms (`rewards.preference_quality`, which says what w means;
    ppl_weight and fact_weight do not apply; the vector reward gains "knowledge" after "facts").

    ## Reference scores
    `info["normalised_score"]` at the last step places the return on `prune_env/envs/reference_scores.json`
    (`prune_env.envs.reference.normalised_score`): 0 = uniform Wanda, 1 = the best known agent at this target
    (linear between table targets). None where the table has no such task or target: another model,
    method, granularity, pattern, reward or data than the defaults, the proxy fidelity, a surrogate other
    than the packaged one, or `surrogate_pessimism` != 0. Returns (final quality, default reward):

    | task | target | uniform | best rule | best known |
    |---|---|---|---|---|
    | smollm2-135m/wanda/block/exact | 0.3 | -0.1811 | zscore-greedy -0.1647 | zscore-greedy -0.1647 |
    | smollm2-135m/wanda/block/exact | 0.4 | -0.4635 | protect-first -0.4205 | protect-first -0.4205 |
    | smollm2-135m/wanda/block/exact | 0.5 | -1.0284 | protect-first -0.8782 | protect-first -0.8782 |
    | smollm2-135m/wanda/block/exact | 0.6 | -2.0833 | protect-first -1.6703 | ppo -1.6164 |
    | smollm2-135m/wanda/block/surrogate | 0.3 | -0.1868 | protect-first -0.1640 | ppo -0.1636 |
    | smollm2-135m/wanda/block/surrogate | 0.4 | -0.4955 | protect-first -0.4335 | ppo -0.4215 |
    | smollm2-135m/wanda/block/surrogate | 0.5 | -0.9745 | protect-first -0.8642 | ppo -0.8366 |
    | smollm2-135m/wanda/block/surrogate | 0.6 | -2.0820 | protect-first -1.6084 | ppo -1.5482 |

    (`prune_env.envs.reference.markdown()`; how it was measured: docs/results/reference-scores/README.md.)

    ## Fidelity
    One strategy object of `prune_env.envs.fidelities` each. `exact`: the real sequential prune and real
    metrics on the evaluation slices; hidden states of the decided prefix are cached, so each step runs
    only the block it just pruned. `proxy`: masks from precomputed dense-calibration score ranks (no
    sequential recalibration) and metrics on the first `proxy_eval_tokens` tokens and `proxy_facts` facts
    of the same slices; much cheaper. `surrogate`: no weight is touched and no forward runs; observations
    come from the dense profile (last_drop = 0) and the terminal metrics from `prune_env.surrogate` fitted
    on exactly evaluated allocations (`surrogate=PATH` of a data set; None: the packaged SmolLM2-135M one,
    refused with `SurrogateMismatchError` for any other model or data), so an episode costs microseconds.
    When the data set's header describes the units (profile, unit sizes, dense metrics, data config:
    `python -m prune_env.surrogate build` writes them) no model is loaded at all: `env.context` is then a
    `SurrogateContext` (units, numel, profile, dense, describe()) and the env builds in well under a second. `info["surrogate_std"]` is the fit's
    spread at the allocation (`Surrogate.uncertainty`, small where its data set has allocations);
    `surrogate_pessimism=k` makes the scalar reward (and `info["quality"]`) the lower bound prediction -
    k * spread, so neither a policy nor a search is paid for leaving the data (conservative model-based
    optimisation); the vector reward stays the prediction. With a preference each objective is lowered by
    k times its own spread: the ppl one by its log-ppl spread, the knowledge one by
    `info["surrogate_knowledge_std"]` (its metric's spread in the objective's units).

    ## Starting State
    The dense model (weights restored bit-exactly on every `reset`), the first unit to decide.
    `reset(options={"target_sparsity": x})` changes the target for that episode. With
    `target_sparsity_range=(lo, hi)` (constructor or reset option) each reset draws the episode's target
    uniformly from it with `self.np_random`, so `reset(seed=s)` picks the same target for the same s and
    one policy can serve a range of targets. The data (calibration and evaluation windows, facts) is
    fixed by `data["seed"]` and is not affected by `reset(seed)`; exact episodes are deterministic.

    ## Model ownership
    The env builds and OWNS its `PruningContext` (its own model from the process's template), so envs
    in a vector env or beside an evaluation env never touch each other's weights; `close` frees that
    model and closes its files. `context=ctx` lends the caller's context instead: the env then prunes
    `ctx.model` itself (the caller sees the episode's masks; `reset` and `close` restore it dense), and
    the model arguments (model, device, dtype, granularity, method, pattern, data) are not used.

    ## Episode End
    Terminates after the last unit. There is no truncation. Stepping a finished episode raises.

    ## Arguments
    Every keyword with its default and meaning: `LayerPruneEnv.__init__`'s Args (`help(LayerPruneEnv)`).

    ## Example
    ```python
    import gymnasium as gym
    env = gym.make("prune_env:prune_env/LayerPrune-v1", model="tiny-llama", granularity="linear",
                   target_sparsity_range=(0.3, 0.6))
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
    ```

    ## Version History
    * v1: `granularity="linear"` observes a fixed role encoding (5 entries for every family) instead of
      the family's linear-type one-hot, so one policy serves Llama, GPT-2, OPT ...; block granularity
      is identical to v0.
    * v0: initial version (the linear-type one-hot's size depends on the model family).
    """

    reset_options = (*RESET_OPTIONS, "preference")

    def __init__(self, model: str = "smollm2-135m", target_sparsity: float = 0.5, granularity: str = "block",
                 method: str = "wanda", pattern: str | None = None, min_sparsity: float = 0.0,
                 max_sparsity: float = 0.9, action_type: str = "continuous", n_actions: int = 11,
                 fidelity: str = "exact", reward: dict | None = None, data: dict | None = None,
                 proxy_eval_tokens: int = 1024, proxy_facts: int = 64, device: str = "cpu", dtype: str = "float32",
                 render_mode: str | None = None, context: PruningContext | SurrogateContext | None = None,
                 target_sparsity_range: tuple[float, float] | None = None, kind_encoding: str = "one_hot",
                 extra_features: list[str] | None = None, reward_mode: str = "scalar", surrogate: str | None = None,
                 action_mode: str = "absolute", surrogate_pessimism: float = 0.0, observe_profile: bool = True,
                 preference_range: tuple[float, float] | None = None, **kwargs):
        """Builds the env's own model context (or borrows `context`), its fidelity and its spaces.

        Args:
            model: a model alias ("smollm2-135m", "tiny-llama" ...), a folder, a .gguf file or a hub id.
            target_sparsity: the parameter-weighted sparsity every episode ends on (until reset options change it).
            granularity: "block" (one unit per decoder block) or "linear" (one unit per linear layer).
            method: the pruning operator, "wanda", "magnitude", "sparsegpt" or a `register_method` name.
            pattern: None (unstructured) or an N:M pattern such as "2:4".
            min_sparsity: the lowest ratio an action asks for.
            max_sparsity: the highest ratio an action asks for (also the highest reachable target).
            action_type: "continuous" (Box(0, 1)) or "discrete" (Discrete(n_actions), a grid of ratios).
            n_actions: the discrete grid's size (min_sparsity .. max_sparsity).
            fidelity: "exact", "proxy" or "surrogate" (see Fidelity).
            reward: RewardConfig values (ppl_weight, fact_weight, shaping_weight, terms ...); None: defaults.
            data: DataConfig values (text, facts, slice sizes, seed ...); None: defaults.
            proxy_eval_tokens: the proxy fidelity's evaluation tokens.
            proxy_facts: the proxy fidelity's facts.
            device: where the model runs ("cpu", "cuda", ...).
            dtype: the model's weights' dtype ("float32", "bfloat16", ...).
            render_mode: None, "ansi" or "rgb_array".
            context: None (the env builds and owns its model) or a lent PruningContext / SurrogateContext.
            target_sparsity_range: None or (lo, hi): each reset draws the target from it with `np_random`.
            kind_encoding: "one_hot" (v0: the family's linear types) or "role" (v1: five fixed roles).
            extra_features: names of registered observation features appended to the observation.
            reward_mode: "scalar" or "vector" (one reward per objective in `reward_space`).
            surrogate: the surrogate data set's path (fidelity "surrogate"); None: the packaged SmolLM2 one.
            action_mode: "absolute" or "budget" (continuous only: a asks for 2 * a * budget_left).
            surrogate_pessimism: k >= 0: the surrogate's scalar reward is prediction - k * its spread.
            observe_profile: False: observation entries 0-1 (z_wanda, z_grad) read 0.
            preference_range: None (off) or (lo, hi) in [0, 1]: each reset draws the preference w (Rewards).

        Raises:
            ValueError: an unknown keyword or an invalid value, named with its fix, before any model loads.
        """
        self._fidelity = None  # close() works from the fidelity's set-up on
        for name, value in (("min_sparsity", min_sparsity), ("max_sparsity", max_sparsity)):
            check_ratio(name, value)
        if not min_sparsity <= max_sparsity:
            raise ValueError(f"need 0 <= min_sparsity <= max_sparsity < 1, got min={min_sparsity} max={max_sparsity}")
        for name, value, allowed in (("fidelity", fidelity, FIDELITIES), ("action_type", action_type, ACTION_TYPES),
                                     ("action_mode", action_mode, ACTION_MODES),
                                     ("kind_encoding", kind_encoding, KIND_ENCODINGS),
                                     ("reward_mode", reward_mode, REWARD_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        self.min_sparsity, self.max_sparsity = float(min_sparsity), float(max_sparsity)
        if action_mode == "budget" and action_type != "continuous":
            raise ValueError('action_mode="budget" needs action_type="continuous" (a discrete grid is absolute)')
        self.fidelity, self.action_type, self.action_mode = fidelity, action_type, action_mode
        self.surrogate_pessimism = float(check_number("surrogate_pessimism", surrogate_pessimism, low=0.0))
        self.kind_encoding, self.reward_mode = kind_encoding, reward_mode
        self.observe_profile = check_flag("observe_profile", observe_profile)
        self.preference_range = check_preference_range(preference_range)
        self.preference: float | None = None  # the episode's w (None: preference conditioning off)
        self._set_features(extra_features)
        proxy_eval_tokens = check_whole("proxy_eval_tokens", proxy_eval_tokens, 1)
        proxy_facts = check_whole("proxy_facts", proxy_facts, 1)
        n_actions = check_whole("n_actions", n_actions, 2)
        self._setup(unknown=kwargs, target_sparsity=target_sparsity, target_sparsity_range=target_sparsity_range,
                    target_bounds=(self.min_sparsity, self.max_sparsity), render_mode=render_mode, reward=reward,
                    context=context, context_args=dict(model=model, device=device, dtype=dtype,
                                                       granularity=granularity, method=method, pattern=pattern,
                                                       data=data), fidelity=fidelity, surrogate=surrogate)
        self.reward_config, fidelity_reward = preference_configs(self.reward_config, self.preference_range)
        self._observer = UnitObservation(self.context, kind_encoding, self.observe_profile, len(self.extra_features),
                                         self.preference_range is not None)
        self._unit_numel = [u.numel for u in self.units]  # read every step, computed once
        self._tail = [sum(self._unit_numel[i:]) for i in range(len(self.units) + 1)]  # weights of units i..
        self.grid = np.linspace(min_sparsity, max_sparsity, n_actions) if action_type == "discrete" else None
        self.action_space = (spaces.Discrete(n_actions) if action_type == "discrete"
                             else spaces.Box(0.0, 1.0, (1,), dtype=np.float32))
        self.observation_space = spaces.Box(-10.0, 10.0, (self._observer.size,), dtype=np.float32)
        n_objectives = len(self.reward_config.names())
        self.reward_space = spaces.Box(-np.inf, np.inf, (n_objectives,), dtype=np.float64)
        try:
            self._fidelity = make_fidelity(fidelity, self.context, proxy_eval_tokens=proxy_eval_tokens,
                                           proxy_facts=proxy_facts, surrogate=surrogate, reward=fidelity_reward)
            if self.reward_config.knowledge_weight is not None:  # an undefined knowledge reward fails now
                check_knowledge_reference(self._fidelity.reference, self.reward_config.knowledge_metric)
        except BaseException:
            self.close()  # an owned context's model and file go at once, not at garbage collection
            raise
        self._reference = self._fidelity.reference
        comparable = self.surrogate_pessimism == 0.0 and (fidelity != "surrogate" or surrogate is None) and \
            self.preference_range is None
        self._task = reference.task_for(self.context, fidelity, self.reward_config) if comparable else None
        self._step = None  # None: reset() not called yet
        self._ratios = [0.0] * len(self.units)
        self._zeros = [0] * len(self.units)
        self._prev_action, self._last_drop = 0.0, 0.0

    # -- Gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        target = self._reset_target(seed, options)
        self.preference = draw_preference(self.preference_range, options or {}, self.np_random)  # after the target
        self._fidelity.reset()
        self._step, self._prev_action, self._last_drop = 0, 0.0, 0.0
        self._ratios = [0.0] * len(self.units)
        self._zeros = [0] * len(self.units)
        self._final: dict = {}
        info = {"target_sparsity": target}
        return self._observation(), info if self.preference is None else {**info, "preference": self.preference}

    @torch.no_grad()
    def step(self, action):
        if self._step is None:
            raise RuntimeError("call reset() before step()")
        if self._step >= len(self.units):
            raise RuntimeError("the episode has ended: call reset() before stepping again")
        ratio = self._ratio_from_action(action)
        zeros, drop = self._fidelity.prune_unit(self._step, ratio)
        if drop is not None:
            self._last_drop = drop
        self._ratios[self._step] = zeros / self._unit_numel[self._step]
        self._zeros[self._step] = zeros
        self._prev_action = ratio
        self._step += 1
        terminated = self._step == len(self.units)
        shaping = -self.reward_config.shaping_weight * self._last_drop
        vector = np.zeros(self.reward_space.shape, dtype=np.float64)
        vector[0] = shaping
        reward = shaping
        info = {"ratio": self._ratios[self._step - 1], "achieved_sparsity": sum(self._zeros) / self.context.total_numel,
                "target_sparsity": self.target_sparsity}
        if self.preference is not None:
            info["preference"] = self.preference
        if terminated:
            metrics = self._fidelity.finish(list(self._ratios), list(self._zeros))
            allocation = list(self._ratios)
            if self.preference is None:
                final = scalar_quality(metrics, allocation, self, self.reward_config)
                if "surrogate_std" in metrics:  # a lower confidence bound: no reward for leaving the data
                    final -= self.surrogate_pessimism * metrics["surrogate_std"]
            else:
                final = preference_quality(metrics, allocation, self, self.reward_config, self.preference,
                                           self.surrogate_pessimism * metrics.get("surrogate_std", 0.0),
                                           self.surrogate_pessimism * metrics.get("surrogate_knowledge_std", 0.0))
            vector += objectives(metrics, allocation, self, self.reward_config)
            reward += final
            score = None if self._task is None else reference.normalised_score(self._task, self.target_sparsity, final)
            info.update(metrics, allocation=allocation, quality=final, normalised_score=score)
            self._final = info
        reward = vector if self.reward_mode == "vector" else float(reward)
        return self._observation(), reward, terminated, False, info

    # -- checkpoint / rollback ---------------------------------------------------------------------
    def checkpoint(self) -> LayerCheckpoint:
        return LayerCheckpoint(self._step, list(self._ratios), list(self._zeros), self._prev_action, self._last_drop,
                           self._fidelity.checkpoint())

    def rollback(self, checkpoint: LayerCheckpoint) -> None:
        """Undo every unit decided after `checkpoint` (their dense weights come back bit-exactly)."""
        self._fidelity.rollback(checkpoint.fidelity, list(range(checkpoint.step, self._step or 0)))
        self._step, self._ratios, self._zeros = checkpoint.step, list(checkpoint.ratios), list(checkpoint.zeros)
        self._prev_action, self._last_drop = checkpoint.prev_action, checkpoint.last_drop
        self._final = {}

    def close(self):
        """Releases the fidelity's buffers, then (base) the context: an owned model goes, a lent one is dense."""
        if self._fidelity is not None:
            self._fidelity.close()
            self._fidelity = None
        super().close()

    # -- internals ---------------------------------------------------------------------------------
    def _ratio_from_action(self, action) -> float:
        if self.action_type == "discrete":
            value = np.asarray(action)
            # an integer index (integral floats too); never truncate 1.5 or NaN to an index
            if value.size != 1 or value.dtype.kind not in "iuf" or not np.isfinite(value).all() or \
                    float(value.reshape(())) % 1 or not 0 <= float(value.reshape(())) < self.action_space.n:
                raise ValueError(f"action {action!r} is not in {self.action_space}: give one integer index")
            raw = float(self.grid[int(value.reshape(()))])
        else:
            value = np.asarray(action)
            if value.dtype.kind not in "iuf":
                raise ValueError(f"action {action!r} is not a real number (it is {value.dtype}): give a float in "
                                 f"[0, 1] of shape (1,), never a string, bool or complex number")
            if value.shape not in ((), (1,)):
                raise ValueError(f"action of shape {value.shape} is not in {self.action_space}: give shape (1,)")
            value = value.astype(np.float64).reshape(-1)
            if not np.isfinite(value).all():
                raise ValueError(f"action {action!r} must be one finite number in [0, 1] (shape (1,))")
            a = float(np.clip(value[0], 0, 1))  # outside the Box: clipped, like other Box envs
            if self.action_mode == "budget":
                raw = float(np.clip(2 * a * self._budget_left(self._step), self.min_sparsity, self.max_sparsity))
            else:
                raw = self.min_sparsity + a * (self.max_sparsity - self.min_sparsity)
        bounds = wall_bounds(self.target_sparsity * self.context.total_numel, sum(self._zeros),
                             self._unit_numel[self._step], self._tail[self._step + 1], self.min_sparsity,
                             self.max_sparsity)
        return check_ratio("ratio", min(max(project(raw, bounds), 0.0), 0.999))

    def _allocation(self) -> list[float]:
        return list(self._ratios)

    def _observation(self) -> np.ndarray:
        index = min(self._step or 0, len(self.units) - 1)
        if self._step is None:  # before the first reset: the unit's fixed entries, the episode's all 0
            return self._observer.observe(index, 0.0, 0.0, 0.0, 0.0, 0.0, self._feature_values(index))
        return self._observer.observe(index, self._ratios[index], sum(self._zeros) / self.context.total_numel,
                                      self._budget_left(index), self._prev_action, self._last_drop,
                                      self._feature_values(index), self.preference or 0.0)

    def _budget_left(self, index: int) -> float:
        """The sparsity units index.. must average (by parameters) for the episode to meet its target."""
        remaining = self._tail[index]
        return (self.target_sparsity * self.context.total_numel - sum(self._zeros)) / remaining if remaining else 0.0

    # -- helpers for agents ------------------------------------------------------------------------
    def action_for_ratio(self, ratio: float):
        """The action that asks for `ratio` (before the wall): lets allocation agents play the env."""
        if self.action_type == "discrete":
            return int(np.argmin(np.abs(self.grid - ratio)))
        if self.action_mode == "budget":
            budget = self._budget_left(self._step or 0)
            return np.array([np.clip(ratio / (2 * budget), 0, 1) if budget > 0 else 0.0], dtype=np.float32)
        span = self.max_sparsity - self.min_sparsity
        return np.array([0.0 if span == 0 else np.clip((ratio - self.min_sparsity) / span, 0, 1)], dtype=np.float32)
