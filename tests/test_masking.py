"""Pruning operators against direct computations on a tiny model's real layers and activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prune_env.pruning.calibration import BlockCall, ReplayState, advance, collect_stats, record_inputs, run_block
from prune_env.pruning.masking import magnitude_mask, parse_pattern, sparsegpt_prune, wanda_mask
from prune_env.models import decoder_blocks, linear_layers, weight_matrix
from prune_env.pruning.sequential import block_stats, calibration_batches, prune_model
from prune_env.pruning.snapshot import MaskedModel, PackedMasks, RankedMasks
from prune_env.tiny import tiny_model

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj")


@pytest.fixture(scope="module")
def llama():
    model, _ = tiny_model("llama", seed=3)
    return model


def layer_inputs(model, names, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs (tokens x in_features, float64) each named linear receives in a plain forward."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, inputs, _out, name=name: seen[name].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1])))
        for name in names]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks).double() for name, chunks in seen.items()}


@pytest.fixture(scope="module")
def activations(llama, calib_ids):
    return layer_inputs(llama, LAYERS, calib_ids)


def direct_wanda_mask(weight: torch.Tensor, x: torch.Tensor, per_row_zeros: list[int]) -> torch.Tensor:
    """Per output row: drop the k lowest |W_ij| * ||X_j||_2 (numpy stable argsort)."""
    norm = np.sqrt((x.numpy() ** 2).sum(0))
    score = np.abs(weight.detach().double().numpy()) * norm[None, :]
    keep = np.ones(score.shape, dtype=bool)
    for row, k in enumerate(per_row_zeros):
        keep[row, np.argsort(score[row], kind="stable")[:k]] = False
    return torch.from_numpy(keep)


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, x: torch.Tensor) -> float:
    w, w2 = weight.double(), new_weight.double()
    return float(((x @ w.t() - x @ w2.t()) ** 2).sum())


def hessian(x: torch.Tensor) -> torch.Tensor:
    return (2.0 / x.shape[0]) * x.t() @ x


# ----------------------------------------------------------------------------- Wanda


@pytest.mark.parametrize("name", LAYERS)
def test_wanda_equals_direct_argsort(llama, activations, name):
    weight = weight_matrix(llama.get_submodule(name))
    x = activations[name]
    rows, cols = weight.shape
    norm = x.pow(2).sum(0).sqrt().float()
    for ratio in (0.25, 0.5, 0.75):
        expected = direct_wanda_mask(weight, x, [int(ratio * cols)] * rows)
        assert torch.equal(wanda_mask(weight, norm, ratio), expected)


def test_collect_stats_norm_equals_own_hook(llama, calib_ids, activations):
    modules = {name: llama.get_submodule(name) for name in LAYERS}
    with collect_stats(modules, hessian=True) as stats:
        with torch.no_grad():
            llama(input_ids=calib_ids, use_cache=False)
    for name in LAYERS:
        x = activations[name]
        assert stats[name].tokens == x.shape[0]
        assert torch.allclose(stats[name].norm.double(), x.pow(2).sum(0).sqrt(), rtol=1e-5)
        assert torch.allclose(stats[name].hessian.double(), hessian(x), rtol=1e-4, atol=1e-5)


def test_block_stats_stop_before_the_last_matmul_with_the_same_statistics(llama, calib_ids):
    """The Wanda statistics pass ends once every linear of the block has its input (the down projection
    never runs its matmul) and gives the same statistics as a full forward of the block."""
    block_linears = {ref.name: ref.module for ref in linear_layers(llama) if ref.block_index == 1}
    state = record_inputs(llama, calibration_batches(calib_ids, 2, "cpu"))
    advance(llama, state, 1)
    down = llama.get_submodule("model.layers.1.mlp.down_proj")
    runs = []
    handle = down.register_forward_hook(lambda *_: runs.append(1))
    try:
        early = block_stats(decoder_blocks(llama)[1], block_linears, state, "sparsegpt")
    finally:
        handle.remove()
    assert runs == [] and state.next_block == 1
    with collect_stats(block_linears, hessian=True) as full, torch.no_grad():
        for b, hidden in enumerate(state.hidden):
            run_block(decoder_blocks(llama)[1], hidden, state.calls[b][1])
    assert set(early) == set(full) == set(block_linears)
    for name in block_linears:
        assert early[name].tokens == full[name].tokens == calib_ids.numel()
        assert torch.equal(early[name].sq_sum, full[name].sq_sum) and torch.equal(early[name].hessian, full[name].hessian)


class _RoutedBlock(torch.nn.Module):
    """A block whose `first` linear runs only for some inputs, like an expert a router skips."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mid, self.last = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, hidden, routed: bool):
        if routed:
            hidden = self.first(hidden)
        return self.last(self.mid(hidden))


def test_block_stats_with_a_linear_that_some_forwards_skip():
    """A forward that skips a linear must not make the next forward stop before its other linears."""
    block = _RoutedBlock()
    modules = {"first": block.first, "mid": block.mid, "last": block.last}
    hidden = [torch.randn(1, 5, 4), torch.randn(1, 5, 4)]
    calls = [[BlockCall((), {"routed": False})], [BlockCall((), {"routed": True})]]
    early = block_stats(block, modules, ReplayState(hidden, calls), "wanda")
    with collect_stats(modules) as full, torch.no_grad():
        for h, call in zip(hidden, calls):
            run_block(block, h, call[0])
    assert {name: entry.tokens for name, entry in early.items()} == {"first": 5, "mid": 10, "last": 10}
    for name in modules:
        assert torch.equal(early[name].sq_sum, full[name].sq_sum)


def test_sequential_masks_for_every_block(calib_ids):
    """prune_model's block-b masks equal Wanda on the inputs block b sees behind the pruned prefix
    (statistics taken before any linear of block b is pruned, as in the Wanda reference code)."""
    model, _ = tiny_model("llama", seed=5)
    refs = linear_layers(model)
    masked, _ = prune_model(model, calib_ids, {ref.name: 0.5 for ref in refs}, "wanda", batch_size=2)
    stored = {name: keep.clone() for name, keep in masked.masks.items()}
    for block in range(3):
        later = [ref.name for ref in refs if ref.block_index >= block]
        masked.restore(later)  # prefix stays pruned with its stored masks
        names = [ref.name for ref in refs if ref.block_index == block]
        xs = layer_inputs(model, names, calib_ids)
        for name in names:
            weight = masked.dense[name]
            expected = direct_wanda_mask(weight, xs[name], [weight.shape[1] // 2] * weight.shape[0])
            assert torch.equal(stored[name], expected), name
        for name in names:  # prune this block again before looking at the next one
            masked.apply(name, stored[name])
    masked.restore()


# ----------------------------------------------------------------------------- N:M


def _groups_zero_count(keep: torch.Tensor, m: int) -> torch.Tensor:
    rows, cols = keep.shape
    return (~keep).reshape(rows, cols // m, m).sum(-1)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_exactly_n_zeros_per_group(llama, activations, method, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    for name in LAYERS:
        weight = weight_matrix(llama.get_submodule(name)).detach()
        x = activations[name]
        if method == "magnitude":
            keep = magnitude_mask(weight, 0.0, pattern)  # the ratio is ignored: N:M fixes it
            new = weight * keep
        elif method == "wanda":
            keep = wanda_mask(weight, x.pow(2).sum(0).sqrt().float(), 0.0, pattern)
            new = weight * keep
        else:
            keep, new = sparsegpt_prune(weight, hessian(x).float(), 0.0, pattern, blocksize=16)
        assert torch.equal(_groups_zero_count(keep, m), torch.full_like(_groups_zero_count(keep, m), n))
        assert torch.all(new[~keep] == 0)
        if method != "sparsegpt":
            # the N removed in a group are the N lowest scores of that group
            score = weight.abs().double() * (1.0 if method == "magnitude" else x.pow(2).sum(0).sqrt()[None, :])
            groups = score.reshape(score.shape[0], -1, m)
            threshold_removed = groups.masked_fill(~(~keep).reshape(groups.shape), -math.inf).amax(-1)
            threshold_kept = groups.masked_fill(keep.reshape(groups.shape) == 0, math.inf).amin(-1)
            assert torch.all(threshold_removed <= threshold_kept)


def test_nm_needs_width_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 8"):
        magnitude_mask(torch.randn(4, 12), 0.0, "4:8")


# ----------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("pattern,ratio", [(None, 0.5), (None, 0.7), ("2:4", 0.5)])
def test_sparsegpt_beats_wanda_reconstruction(llama, activations, name, pattern, ratio):
    weight = weight_matrix(llama.get_submodule(name)).detach()
    x = activations[name]
    keep_w = wanda_mask(weight, x.pow(2).sum(0).sqrt().float(), ratio, pattern)
    keep_s, new_s = sparsegpt_prune(weight, hessian(x).float(), ratio, pattern)
    assert int((~keep_s).sum()) == int((~keep_w).sum())  # same number of weights removed
    assert torch.all(new_s[~keep_s] == 0)
    error_wanda = reconstruction_error(weight, weight * keep_w, x)
    error_sparsegpt = reconstruction_error(weight, new_s, x)
    assert error_sparsegpt < error_wanda


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.123, 0.9, 0.999])
def test_unstructured_counts_are_exact(llama, activations, ratio):
    for name in LAYERS:
        weight = weight_matrix(llama.get_submodule(name)).detach()
        x = activations[name]
        target = round(ratio * weight.numel())
        assert int((~magnitude_mask(weight, ratio)).sum()) == target
        wanda = wanda_mask(weight, x.pow(2).sum(0).sqrt().float(), ratio)
        assert int((~wanda).sum()) == target
        per_row = (~wanda).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1  # spread evenly over output rows
        keep, new = sparsegpt_prune(weight, hessian(x).float(), ratio, blocksize=7)  # ragged column blocks
        assert int((~keep).sum()) == target
        assert int((new == 0).sum()) >= target
        ranked = RankedMasks({name: weight}, "wanda", {name: x.pow(2).sum(0).sqrt().float()})
        assert torch.equal(ranked.keep(name, ratio), wanda)
        ranked_mag = RankedMasks({name: weight}, "magnitude", None)
        assert torch.equal(ranked_mag.keep(name, ratio), magnitude_mask(weight, ratio))


def test_magnitude_is_global_smallest(llama):
    weight = weight_matrix(llama.get_submodule(LAYERS[1])).detach()
    flat = np.abs(weight.numpy()).reshape(-1)
    k = round(0.4 * flat.size)
    expected = np.ones(flat.size, dtype=bool)
    expected[np.argsort(flat, kind="stable")[:k]] = False
    assert torch.equal(magnitude_mask(weight, 0.4), torch.from_numpy(expected.reshape(weight.shape)))


def test_ties_are_broken_by_position():
    weight = torch.ones(3, 8)
    keep = wanda_mask(weight, torch.ones(8), 0.5)
    assert torch.equal(keep, torch.tensor([[False] * 4 + [True] * 4] * 3))
    assert torch.equal(magnitude_mask(weight, 0.25), torch.tensor([False] * 6 + [True] * 18).reshape(3, 8))


# ----------------------------------------------------------------------------- restore, determinism


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_restore_is_bit_exact(calib_ids, method):
    model, _ = tiny_model("llama", seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refs = linear_layers(model)
    masked, result = prune_model(model, calib_ids, {ref.name: 0.6 for ref in refs}, method, batch_size=2)
    assert result.achieved_sparsity == pytest.approx(0.6, abs=1e-3)
    changed = [name for name in masked.dense if not torch.equal(weight_matrix(model.get_submodule(name)),
                                                               before[name + ".weight"])]
    assert len(changed) == len(refs)
    first = refs[0].name
    masked.restore([first])
    assert torch.equal(model.get_submodule(first).weight, before[first + ".weight"])
    assert first not in masked.masks and len(masked.masks) == len(refs) - 1
    masked.restore()
    assert masked.masks == {}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("family,dtype,on_disk", [("llama", torch.float32, None), ("llama", torch.bfloat16, None),
                                                   ("gpt2", torch.float32, None), ("gpt2", torch.float32, False)])
def test_dense_snapshot_round_trips_bit_exactly(family, dtype, on_disk):
    """The snapshot (an unlinked file on CPU, or a copy) gives back the exact [out, in] weights after pruning."""
    model, _ = tiny_model(family, seed=3)
    model = model.to(dtype)
    refs = linear_layers(model)
    before = {ref.name: weight_matrix(ref.module).detach().clone() for ref in refs}
    masked = MaskedModel({ref.name: ref.module for ref in refs}, snapshot_on_disk=on_disk)
    assert (masked.dense._file is not None) == (on_disk is None)  # CPU defaults to the file
    for ref in refs:
        keep = torch.rand(weight_matrix(ref.module).shape, generator=torch.Generator().manual_seed(0)) > 0.5
        masked.apply(ref.name, keep)
        assert torch.equal(weight_matrix(ref.module), before[ref.name] * keep.to(dtype))
    assert sorted(masked.dense) == sorted(before) and len(masked.dense) == len(refs)
    for name, weight in masked.dense.items():
        assert weight.dtype == dtype and torch.equal(weight, before[name]), name
    masked.restore()
    assert all(torch.equal(weight_matrix(ref.module), before[ref.name]) for ref in refs)


def test_packed_masks_round_trip_odd_shapes_and_count_zeros():
    masks = PackedMasks()
    gen = torch.Generator().manual_seed(2)
    kept = {"a": torch.rand(7, 13, generator=gen) > 0.3, "b": torch.zeros(3, 5, dtype=torch.bool),
            "c": torch.ones(1, 9, dtype=torch.bool)}
    for name, keep in kept.items():
        masks.set(name, keep)
    assert len(masks) == 3 and sorted(masks) == ["a", "b", "c"]
    for name, keep in kept.items():
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], keep), name
        assert masks.zeros(name) == int((~keep).sum())
    assert dict(masks).keys() == kept.keys() and masks != {}
    masks.pop("a")
    assert "a" not in masks and masks.zeros("a") == 0 and masks.pop("a") is None


def test_apply_zeroes_exactly_the_mask(llama):
    refs = linear_layers(llama)
    masked = MaskedModel({ref.name: ref.module for ref in refs})
    name = refs[4].name
    keep = torch.rand(masked.dense[name].shape, generator=torch.Generator().manual_seed(0)) > 0.3
    masked.apply(name, keep)
    live = weight_matrix(llama.get_submodule(name))
    assert torch.equal(live, masked.dense[name] * keep)
    assert masked.zeros(name) == int((~keep).sum())
    assert masked.sparsity(name) == pytest.approx(float((~keep).float().mean()))
    masked.restore()
    assert torch.equal(live, masked.dense[name])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_inputs_same_masks(calib_ids, method):
    masks = []
    for _ in range(2):
        model, _ = tiny_model("llama", seed=9)
        refs = linear_layers(model)
        masked, _ = prune_model(model, calib_ids, {ref.name: 0.45 for ref in refs}, method, batch_size=2)
        masks.append(({k: v.clone() for k, v in masked.masks.items()},
                      {ref.name: weight_matrix(ref.module).clone() for ref in refs}))
    (keep_a, weights_a), (keep_b, weights_b) = masks
    assert keep_a.keys() == keep_b.keys()
    assert all(torch.equal(keep_a[k], keep_b[k]) for k in keep_a)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5, "0.5", True])
def test_operators_reject_bad_ratios(bad):
    """The operators check ratios with prune_env.validation.check_ratio: the value and [0, 1) are named."""
    for operator in (lambda: magnitude_mask(torch.randn(4, 4), bad),
                     lambda: wanda_mask(torch.randn(4, 4), torch.ones(4), bad)):
        with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)") as error:
            operator()
        assert repr(bad) in str(error.value)


def test_operators_accept_the_interval():
    assert int((~magnitude_mask(torch.randn(4, 4), 0)).sum()) == 0
    assert int((~magnitude_mask(torch.randn(10, 10), 0.999)).sum()) == 100


@pytest.mark.parametrize("bad,message", [("4:2", "0 < N < M"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                         ("x", "malformed"), ("2:4:8", "malformed"), ("2-4", "malformed"),
                                         ("a:b", "malformed")])
def test_parse_pattern_rejects(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_pattern(bad)
    assert repr(bad) in str(error.value)


def test_parse_pattern_accepts():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern(None) is None and parse_pattern("unstructured") is None


def test_selection_fast_path_equals_stable_sort_including_ties():
    """The kthvalue fast path must remove exactly what a stable per-row argsort removes."""
    from prune_env.pruning.masking import _lowest_per_row, _row_counts

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, cols = torch.randint(1, 20, (2,), generator=g).tolist()
        # odd trials: few distinct values, so ties on the threshold are common
        score = (torch.randint(0, 4, (rows, cols), generator=g).float() if trial % 2
                 else torch.rand(rows, cols, generator=g))
        counts = _row_counts(rows, cols, torch.rand(1, generator=g).item() * 0.999)
        order = torch.argsort(score, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(cols).expand_as(order).contiguous())
        assert torch.equal(_lowest_per_row(score, counts), ranks >= counts[:, None]), trial
