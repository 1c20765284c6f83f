"""Block-sequential replay: record what each decoder block receives, then run blocks one at a time.

Every argument a block gets (position embeddings, masks, per-layer sliding windows in Gemma-3, GPT-2's
positional arguments) is recorded by temporarily swapping the blocks for recorders and running the base
model once, so new transformers versions and new families keep working without model-specific code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..models import decoder_blocks, weight_matrix


@dataclass
class BlockCall:
    """Positional and keyword arguments (after the hidden state) that one block receives."""

    args: tuple
    kwargs: dict


@dataclass
class TokenBatch:
    """A batch of token ids (right padded where attention_mask has zeros)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "TokenBatch":
        """The same batch (subclass fields included) with its tensors on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=move(self.attention_mask),
                       position_ids=move(self.position_ids))


@dataclass
class ReplayState:
    """Hidden states at the input of block `next_block` for each batch, plus every block's call args."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]  # calls[batch][block]
    next_block: int = 0

    def clone(self) -> "ReplayState":
        return ReplayState([h.clone() for h in self.hidden], self.calls, self.next_block)


class _Recorder(nn.Module):
    def __init__(self, index: int, sink: list[BlockCall], capture: list[torch.Tensor]):
        super().__init__()
        self.index, self.sink, self.capture = index, sink, capture

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.capture.append(hidden_states)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
        self.sink.append(BlockCall(args=tuple(None if _is_cache(a) else a for a in args), kwargs=kwargs))
        return hidden_states


class _Injector(nn.Module):
    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


def _is_cache(value) -> bool:
    return value.__class__.__name__.endswith("Cache")


@contextmanager
def _swapped_blocks(model: nn.Module, replacements: list[nn.Module]) -> Iterator[None]:
    blocks = decoder_blocks(model)
    originals = list(blocks)
    try:
        for i, module in enumerate(replacements):
            blocks[i] = module
        yield
    finally:
        for i, module in enumerate(originals):
            blocks[i] = module


def _base_forward(model: nn.Module, batch: TokenBatch):
    extra = {} if batch.position_ids is None else {"position_ids": batch.position_ids}
    return model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra)


@torch.no_grad()
def record_inputs(model: nn.Module, batches: list[TokenBatch]) -> ReplayState:
    """Hidden states entering block 0 and the call arguments of every block, for each batch."""
    n_blocks = len(decoder_blocks(model))
    hidden, calls = [], []
    for batch in batches:
        sink: list[BlockCall] = []
        capture: list[torch.Tensor] = []
        with _swapped_blocks(model, [_Recorder(i, sink, capture) for i in range(n_blocks)]):
            _base_forward(model, batch)
        hidden.append(capture[0])
        calls.append(sink)
    return ReplayState(hidden=hidden, calls=calls)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def advance(model: nn.Module, state: ReplayState, upto: int | None = None) -> ReplayState:
    """Run blocks next_block..upto-1 on every batch in place (the prefix is never recomputed)."""
    blocks = decoder_blocks(model)
    upto = len(blocks) if upto is None else upto
    for index in range(state.next_block, upto):
        for b, hidden in enumerate(state.hidden):
            state.hidden[b] = run_block(blocks[index], hidden, state.calls[b][index])
    state.next_block = max(state.next_block, upto)
    return state


@torch.no_grad()
def final_hidden(model: nn.Module, batch: TokenBatch, last_hidden: torch.Tensor) -> torch.Tensor:
    """Apply what the base model does after its last block (final norm, projections) to `last_hidden`."""
    n_blocks = len(decoder_blocks(model))
    injectors = [_Injector(None) for _ in range(n_blocks - 1)] + [_Injector(last_hidden)]
    with _swapped_blocks(model, injectors):
        return _base_forward(model, batch).last_hidden_state


@dataclass
class ActivationStats:
    """Per input feature sum of squares (Wanda's ||X_j||_2^2) and, optionally, SparseGPT's Hessian."""

    sq_sum: torch.Tensor
    tokens: int = 0
    hessian: torch.Tensor | None = None

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt()


class StatsComplete(Exception):
    """Raised by `collect_stats(stop_when_complete=True)` once every watched linear has seen its input."""


@contextmanager
def collect_stats(modules: dict[str, nn.Module], hessian: bool = False, stop_when_complete: bool = False,
                  into: dict[str, ActivationStats] | None = None) -> Iterator[dict[str, ActivationStats]]:
    """Accumulate input statistics of the given linears (into `into` if given) while the caller runs forwards.

    With `stop_when_complete`, the forward is cut short (StatsComplete) as soon as every linear has
    received its input in this context, before the last one's matmul: a statistics pass needs no block
    output, and skipping a block's down projection saves about a quarter of the pass. Use one context
    per forward then (accumulating with `into`), so that a linear a forward skips (an unrouted expert)
    cannot make the next forward stop early.
    """
    stats: dict[str, ActivationStats] = {} if into is None else into
    seen: set[str] = set()

    def make_hook(name: str, module: nn.Module) -> Callable:
        width = weight_matrix(module).shape[1]

        def hook(_module, inputs) -> None:  # a pre-hook: must return None, or it would replace the input
            x = inputs[0].detach().reshape(-1, width).float()
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = ActivationStats(torch.zeros(width, device=x.device))
                if hessian:
                    entry.hessian = torch.zeros(width, width, device=x.device)
            entry.sq_sum += (x * x).sum(0)
            n_old, n_new = entry.tokens, entry.tokens + x.shape[0]
            if entry.hessian is not None:  # running mean of 2 X X^T over tokens, as SparseGPT's add_batch
                entry.hessian.mul_(n_old / n_new).addmm_(x.t(), x, alpha=2.0 / n_new)
            entry.tokens = n_new
            if stop_when_complete:
                seen.add(name)
                if len(seen) == len(modules):
                    raise StatsComplete

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, module)) for name, module in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
