"""LayerPrune's observation of the unit about to be decided (its entries are tabled in LayerPruneEnv's docstring).

Kept apart from the env so that env.py reads as spaces, action wall and episode bookkeeping; `linear_role`
is LayerPrune-v1's family-independent kind encoding.
"""

from __future__ import annotations

import numpy as np

from .base import clip_observation

KIND_ENCODINGS = ("one_hot", "role")
ROLES = ("attention_in", "attention_out", "mlp_in", "mlp_out", "other")
BASE_FEATURES = 9  # z_wanda, z_grad, sparsity, depth, param_share, achieved, budget_left, prev_action, last_drop


def linear_role(kind: str) -> str:
    """A family-independent role of a linear from its name inside the block (q/k/v -> attention_in ...)."""
    name = kind.lower()
    attention = any(part in name for part in ("attn", "attention"))
    mlp = any(part in name for part in ("mlp", "ffn", "feed_forward", "fc1", "fc2"))
    out = any(part in name for part in ("o_proj", "out_proj", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "wo"))
    if attention:
        return "attention_out" if out else "attention_in"
    if mlp:
        return "mlp_out" if out else "mlp_in"
    return "other"


class UnitObservation:
    """What an observation holds beside the episode's state: the dense profile, depth, size and kind of
    each unit (fixed for the env's life, so computed once)."""

    def __init__(self, context, kind_encoding: str, observe_profile: bool, n_extra: int, preference: bool = False):
        units = context.units
        linear = context.granularity == "linear"
        self.kinds = (sorted({u.kind for u in units}) if kind_encoding == "one_hot" else list(ROLES)) if linear else []
        self._kind_of = [(u.kind if kind_encoding == "one_hot" else linear_role(u.kind)) for u in units]
        self._context, self._observe_profile = context, observe_profile
        # the episode's preference w right after the kind one-hot (only with preference conditioning)
        self.preference_index = BASE_FEATURES + len(self.kinds) if preference else None
        self.size = BASE_FEATURES + len(self.kinds) + int(preference) + n_extra

    def observe(self, index: int, sparsity: float, achieved: float, budget_left: float, prev_action: float,
                last_drop: float, extra: list[float], preference: float = 0.0) -> np.ndarray:
        """The observation of unit `index` given the episode's state (all 0 before the first reset);
        `preference` is read only when the observer was built with preference=True."""
        ctx = self._context
        n = len(ctx.units)
        profile = (ctx.z_wanda[index], ctx.z_grad[index]) if self._observe_profile else (0.0, 0.0)
        obs = [*profile, sparsity, index / max(n - 1, 1), ctx.units[index].numel / ctx.total_numel, achieved,
               budget_left, prev_action, last_drop]
        obs += [float(self._kind_of[index] == kind) for kind in self.kinds]
        obs += [] if self.preference_index is None else [preference]
        obs += extra
        return clip_observation(obs)
