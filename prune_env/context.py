"""A pruning workbench: one loaded model with its units, data slices, profile and dense reference.

The environments, the one-shot CLI, the agents and the benchmark all work on a `PruningContext`, so
they measure the same thing the same way.

Ownership: every context OWNS its model. A model spec is loaded (or dequantised from GGUF) once per
process; the first context gets the loaded model and a never-pruned `Template` keeps its bytes in an
unlinked file (page cache, not process memory); each further context gets its own model built from the
template (`private_model`), so two environments of one process (a vector env, an evaluation env beside
a training env) can never prune each other's weights, and no second model sits in memory beside them.
Sharing a model is only ever explicit: an environment built with `context=` plays on that context's
model (the caller lends it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from .config_files import dataclass_from_dict
from .data.corpus import load_text
from .data.evaluation import FactScores, check_fact_lengths, evaluate_facts, perplexity, retention
from .data.facts import Fact, load_facts
from .data.knowledge import MajorityBaseline, knowledge_fields, majority_baseline
from .data.windows import split_corpus, tokenize_corpus
from .files import atomic_write_text, cache_root, read_cache
from .models import (LinearRef, check_memory, check_sequence_length, linear_layers, load_model, load_tokenizer,
                     read_header)
from .pruning.calibration import TokenBatch
from .pruning.masking import parse_pattern
from .pruning.scoring import (LinearStats, cache_dir, cache_key, compute_linear_stats, unit_gradient,
                              unit_wanda_percentile, zscore)
from .pruning.sequential import PruneResult, calibration_batches, check_method, prune_model
from .pruning.snapshot import MaskedModel

GRANULARITIES = ("block", "linear")
_TEMPLATES: dict[tuple[str, str, str], "Template"] = {}


@dataclass
class DataConfig:
    """Where text and facts come from and how big each slice is: the one home of the data defaults.

    Args:
        text: the text source: "debian-handbook" (offline), a .txt file, "wikitext2" or "c4" (`load_text`).
        facts: the facts source: "offline", a .jsonl file or "freebaseqa" (`load_facts`).
        calib_samples: calibration windows (the pruning statistics), drawn at seeded random starts.
        calib_seq_len: tokens per calibration window.
        grad_samples: calibration windows of the gradient-importance profile.
        eval_tokens: evaluation tokens for perplexity, cut into whole windows of `eval_seq_len`.
        eval_seq_len: tokens per evaluation window.
        eval_offset: the first evaluation token; None starts right after the calibration region.
        n_facts: facts scored, taken from a seeded permutation (0: all of them).
        facts_offset: facts of that permutation skipped first (disjoint held-out slices).
        batch_size: text windows per forward pass.
        fact_batch_size: facts per forward pass.
        seed: the seed of the windows and of the facts' permutation.
        calib_seed: the seed of the calibration windows alone; None uses `seed`.
    """

    text: str = "debian-handbook"
    facts: str = "offline"
    calib_samples: int = 8
    calib_seq_len: int = 128  # 8 x 128 calibration tokens keep an exact episode near one evaluation (make bench)
    grad_samples: int = 4
    eval_tokens: int = 4096
    eval_seq_len: int = 512
    eval_offset: int | None = None  # None: right after the calibration region
    n_facts: int = 200
    facts_offset: int = 0  # skip this many facts of the seeded permutation (held-out slices)
    batch_size: int = 4
    fact_batch_size: int = 64
    seed: int = 0
    calib_seed: int | None = None  # seed of the calibration windows alone (None: `seed`); facts and evaluation stay

    @property
    def calibration_seed(self) -> int:
        """Why apart from `seed`: a pruning decision depends on which calibration windows were drawn, so
        results are re-checked over several draws with the same evaluation text and facts."""
        return self.seed if self.calib_seed is None else self.calib_seed

    @classmethod
    def from_dict(cls, values: dict | None) -> "DataConfig":
        return dataclass_from_dict(cls, values, "data")


@dataclass
class Unit:
    """A decision unit: a whole decoder block or one linear layer."""

    name: str
    index: int
    linears: list[LinearRef]
    kind: str = "block"

    @property
    def numel(self) -> int:
        return sum(ref.numel for ref in self.linears)


@dataclass
class Metrics:
    """One model state's quality. The balanced fields are the knowledge metric that repeating a frequent
    answer cannot game (prune_env/data/knowledge.py): retention, accuracy and the answer perplexity with every
    (relation, answer) weighing the same within its relation and every relation the same; `retention_by_relation` is the
    balanced retention of each relation the dense model knows a fact of. Required (no defaults), so a
    dense cache written before they existed fails to load and is rebuilt rather than read without them."""

    ppl: float
    fact_acc: float
    fact_nll: float
    fact_retention: float
    fact_retention_balanced: float
    fact_acc_balanced: float
    fact_answer_ppl_balanced: float
    retention_by_relation: dict[str, float]
    greedy_exact: list[bool] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("greedy_exact")
        return data


class Template:
    """The dense weights of one model spec, kept once per process without holding them in memory.

    On CPU every parameter and buffer lives in an unlinked temporary file in the cache directory (the OS
    page cache holds the bytes, as for `DenseSnapshot`), beside a storage-free copy of the model on the meta
    device; `instantiate()` builds a private model from the two, bit-identical to the loaded one (ties such
    as a shared embedding and LM head stay tied). On other devices it is an in-memory model, deep-copied.
    Why: a resident template cost one more fp32 model of peak memory in every process (make bench)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.tokenizer = tokenizer
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self._model, self._file, self._layout = None, None, []
        if not all(t.device.type == "cpu" for t in tensors.values()):
            self._model = copy.deepcopy(model)
            return
        cache_root().mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=cache_root(), prefix="template-")
        memo, offset = {}, 0
        for key, tensor in tensors.items():
            meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            memo[key] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) \
                else meta
            self._layout.append((memo[key], offset))
            offset += self._file.write(memoryview(_raw_bytes(tensor.detach().contiguous())))
        self._file.flush()
        self._skeleton = copy.deepcopy(model, memo)

    @torch.no_grad()
    def instantiate(self) -> torch.nn.Module:
        """A new model with the template's dense weights, owned by the caller."""
        if self._model is not None:
            return copy.deepcopy(self._model)
        memo = {}
        for meta, offset in self._layout:
            real = torch.empty(meta.shape, dtype=meta.dtype)
            view, done = memoryview(_raw_bytes(real)), 0
            while done < len(view):
                got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if got <= 0:
                    raise OSError("the model template's file ended early: rebuild the context in a new process")
                done += got
            memo[id(meta)] = torch.nn.Parameter(real, meta.requires_grad) if isinstance(meta, torch.nn.Parameter) \
                else real
        return copy.deepcopy(self._skeleton, memo)


def _raw_bytes(tensor: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's storage (any dtype)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def load_template(spec: str, device: str, dtype: str) -> tuple[Template, object]:
    """(template, tokenizer) of a model spec, loaded once per process. Read it, never prune it."""
    key = (spec, device, dtype)
    if key not in _TEMPLATES:
        model, tokenizer = load_model(spec, device=device, dtype=dtype)
        _TEMPLATES[key] = Template(model, tokenizer)
    return _TEMPLATES[key], _TEMPLATES[key].tokenizer


def private_model(spec: str, device: str, dtype: str):
    """(model, tokenizer): a model with the template's dense weights that belongs to the caller alone (the
    first caller of a process gets the loaded model itself: no copy is held beside it)."""
    key = (spec, device, dtype)
    if key not in _TEMPLATES:
        model, tokenizer = load_model(spec, device=device, dtype=dtype)
        _TEMPLATES[key] = Template(model, tokenizer)
        return model, tokenizer
    template = _TEMPLATES[key]
    return template.instantiate(), template.tokenizer


def make_units(refs: list[LinearRef], granularity: str) -> list[Unit]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use 'block' or 'linear'")
    if granularity == "linear":
        return [Unit(ref.name, i, [ref], ref.kind) for i, ref in enumerate(refs)]
    blocks: dict[int, list[LinearRef]] = {}
    for ref in refs:
        blocks.setdefault(ref.block_index, []).append(ref)
    return [Unit(f"block.{b}", i, members) for i, (b, members) in enumerate(sorted(blocks.items()))]


def select_facts(facts: list[Fact], n: int, offset: int, seed: int) -> list[Fact]:
    """A seeded permutation sliced at [offset, offset + n): disjoint slices for reward and held-out use."""
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    chosen = order[offset:offset + n] if n else order[offset:]
    if not chosen:
        raise ValueError(f"no facts left: {len(facts)} facts, offset {offset}, n_facts {n}")
    return [facts[i] for i in chosen]


def profile_table(ctx: "PruningContext", z_wanda: list[float] | None = None,
                  sparsity: list[float] | None = None) -> list[dict]:
    """One row per unit, the sensitivity profile as agents read it: unit, index, z_wanda, z_grad (dense),
    sparsity, param_share. Defaults are the dense model's (its z_wanda, nothing pruned); IterativePrune
    passes its live ones. `ctx` may be a SurrogateContext (the same unit and profile fields)."""
    z_wanda = ctx.z_wanda if z_wanda is None else z_wanda
    sparsity = [0.0] * len(ctx.units) if sparsity is None else sparsity
    return [{"unit": unit.name, "index": i, "z_wanda": float(z_wanda[i]), "z_grad": float(ctx.z_grad[i]),
             "sparsity": sparsity[i], "param_share": unit.numel / ctx.total_numel} for i, unit in enumerate(ctx.units)]


class PruningContext:
    """Everything needed to prune and measure one model on fixed data.

    It owns a private copy of the model (envs built on one never share weights with another), refuses
    bad input before the weights load, and caches the sensitivity profile and dense metrics on disk.

    Args:
        model: a model spec: an alias ("smollm2-135m", "tiny-llama"), a local folder, a .gguf file or a
            Hugging Face hub id (`prune_env.models`).
        device: the torch device the model runs on ("cpu", "cuda", "cuda:1", "mps").
        dtype: "float32", "bfloat16" or "float16".
        granularity: the decision unit: "block" (one decoder block) or "linear" (one linear layer).
        method: a registered pruning method ("magnitude", "wanda", "sparsegpt" or `register_method`'s).
        pattern: an N:M pattern such as "2:4"; None for unstructured pruning.
        data: a `DataConfig`, a dict of its fields, or None for its defaults.
        use_cache: read and write the profile and dense-metric caches under `files.cache_root()`.
    """

    def __init__(self, model: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32",
                 granularity: str = "block", method: str = "wanda", pattern: str | None = None,
                 data: DataConfig | dict | None = None, use_cache: bool = True):
        self.spec, self.device, self.dtype = model, device, dtype
        self.method, self.pattern = check_method(method), pattern
        parse_pattern(pattern)
        self.data = d = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
        # Everything the header, the tokenizer and the text can refuse is refused before the weights load.
        header = read_header(model)
        check_sequence_length(header, calib_seq_len=d.calib_seq_len, eval_seq_len=d.eval_seq_len)
        check_memory(header, dtype, device)
        ids = tokenize_corpus(load_text(d.text), load_tokenizer(model))
        self.slices = split_corpus(ids, calib_samples=d.calib_samples, calib_seq_len=d.calib_seq_len,
                                   eval_tokens=d.eval_tokens, eval_seq_len=d.eval_seq_len,
                                   seed=d.calibration_seed, eval_offset=d.eval_offset, source=d.text)
        all_facts = load_facts(d.facts, seed=d.seed)
        self.facts = select_facts(all_facts, d.n_facts, d.facts_offset, d.seed)
        check_fact_lengths(load_tokenizer(model), self.facts, header.context_length, model, d.facts, all_facts)
        self.model, self.tokenizer = private_model(model, device, dtype)
        self.refs = linear_layers(self.model)
        self.masked = MaskedModel({ref.name: ref.module for ref in self.refs})
        self.units = make_units(self.refs, granularity)
        self.granularity = granularity
        self.total_numel = sum(unit.numel for unit in self.units)
        torch_device = next(self.model.parameters()).device
        self.calibration = calibration_batches(self.slices.calibration, d.batch_size, torch_device)
        key = cache_key(model=model, dtype=dtype, text=d.text, seed=d.seed, samples=d.calib_samples,
                        seq_len=d.calib_seq_len, grad=d.grad_samples, tokens=int(ids.numel()),
                        calib=self.slices.calib_starts) if use_cache else None
        grad_batches = [TokenBatch(self.slices.calibration[:d.grad_samples].to(torch_device))]
        self.stats: LinearStats = compute_linear_stats(self.model, self.refs, self.calibration, grad_batches, key)
        self.dense_wanda = [unit_wanda_percentile(u.linears, self.stats.act_norm) for u in self.units]
        self.dense_grad = [unit_gradient(u.linears, self.stats.grad_mean) for u in self.units]
        self.z_wanda, self.z_grad = zscore(self.dense_wanda), zscore(self.dense_grad)
        self.dense = self._dense_metrics(use_cache)

    def _dense_metrics(self, use_cache: bool) -> Metrics:
        """The dense model's metrics on these slices (cached on disk: they never change)."""
        key = cache_key(model=self.spec, dtype=self.dtype, device=self.device, data=asdict(self.data),
                        n_facts=len(self.facts), tokens=self.slices.describe())
        path = cache_dir() / f"dense-{key}.json"
        cached = read_cache(path, lambda p: Metrics(**json.loads(p.read_text(encoding="utf-8")))) if use_cache else None
        if cached is not None:
            return cached
        self.masked.restore()
        metrics = self.evaluate(dense_exact=None)
        if use_cache:
            atomic_write_text(path, json.dumps(asdict(metrics)))
        return metrics

    # -- allocations -------------------------------------------------------------------------------
    def linear_ratios(self, unit_ratios: list[float]) -> dict[str, float]:
        if len(unit_ratios) != len(self.units):
            raise ValueError(f"allocation has {len(unit_ratios)} ratios but the model has {len(self.units)} units")
        return {ref.name: float(r) for unit, r in zip(self.units, unit_ratios) for ref in unit.linears}

    def weighted_sparsity(self, unit_ratios: list[float]) -> float:
        return sum(u.numel * r for u, r in zip(self.units, unit_ratios)) / self.total_numel

    def achieved_sparsity(self) -> float:
        zeros = sum(self.masked.zeros(ref.name) for ref in self.refs)
        return zeros / self.total_numel

    def unit_sparsity(self) -> list[float]:
        return [sum(self.masked.zeros(ref.name) for ref in u.linears) / u.numel for u in self.units]

    # -- actions on the model ----------------------------------------------------------------------
    def restore(self) -> None:
        self.masked.restore()

    def release(self) -> None:
        """Free the weights and close the dense snapshot's file (`env.close()` of an env that owns this
        context); names, sizes, the profile and the dense metrics stay readable, pruning no longer works."""
        self.masked.close()
        self.model.to("meta")

    def prune(self, unit_ratios: list[float], progress: bool = False) -> PruneResult:
        """Sequential calibrated pruning of the whole model to a per-unit allocation (from dense)."""
        self.masked.restore()
        _, result = prune_model(self.model, self.slices.calibration, self.linear_ratios(unit_ratios), self.method,
                                self.pattern, self.data.batch_size, self.masked, progress)
        return result

    @torch.no_grad()
    def evaluate(self, dense_exact: list[bool] | None | str = "dense", windows: torch.Tensor | None = None,
                 facts: list[Fact] | None = None) -> Metrics:
        """Perplexity and facts of the model as it is now, on this context's evaluation slices
        (or on the given windows and facts, e.g. the proxy's smaller ones)."""
        windows = self.slices.evaluation if windows is None else windows
        ppl = perplexity(self.model, windows, self.data.batch_size)
        facts = evaluate_facts(self.model, self.tokenizer, self.facts if facts is None else facts,
                               self.data.fact_batch_size)
        return self.metrics(ppl, facts, dense_exact)

    def metrics(self, ppl: float, facts: FactScores, dense_exact: list[bool] | None | str = "dense",
                questions: list[Fact] | None = None) -> Metrics:
        """Metrics of the scored `questions`: by default this context's facts, or their first len(facts)
        (the proxy's slice); the balanced metric needs each fact's relation and answer.

        dense_exact None means "the dense model itself": retention 1.0 (balanced: over what it knows)."""
        reference = self.dense.greedy_exact if dense_exact == "dense" else dense_exact
        kept = retention(reference, facts.greedy_exact) if reference is not None else 1.0
        questions = self.facts[:len(facts.greedy_exact)] if questions is None else questions
        return Metrics(ppl=ppl, fact_acc=facts.accuracy, fact_nll=facts.nll,
                       fact_retention=kept if not math.isnan(kept) else 0.0,
                       **knowledge_fields(questions, reference, facts.greedy_exact, facts.correct, facts.answer_nll),
                       greedy_exact=facts.greedy_exact)

    @cached_property
    def knowledge_baseline(self) -> MajorityBaseline:
        """The majority-answer baselines of this context's facts and dense answers, computed once: what
        always answering each relation's most frequent known answer scores (prune_env/data/knowledge.py)."""
        return majority_baseline(self.facts, self.dense.greedy_exact)

    def describe(self) -> dict:
        return {"model": self.spec, "device": self.device, "dtype": self.dtype, "granularity": self.granularity,
                "method": self.method, "pattern": self.pattern, "units": len(self.units),
                "text": self.slices.describe(), "facts": {"source": self.data.facts, "n": len(self.facts),
                                                          "offset": self.data.facts_offset}}
