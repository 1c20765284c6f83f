"""Token windows for pruning: tokenise a text and cut calibration and evaluation windows from it.

Why this module exists: pruning needs two disjoint kinds of text, random calibration windows
(Wanda / SparseGPT draw 128 x 2048-token windows from C4 train) and contiguous evaluation windows
(the WikiText-2 perplexity protocol). Where the text comes from is `prune_env.data.corpus`'s job.

Public API::

    tokenize_corpus(text, tokenizer) -> torch.LongTensor            # 1-D
    split_corpus(ids, *, calib_samples, calib_seq_len, eval_tokens, eval_seq_len,
                 seed=0, eval_offset=None, ...) -> TextSlices   # sizes: DataConfig's (their one home)

``python -m prune_env.data fetch [SOURCE]`` (prune_env/data/__main__.py) fills the text cache once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch


__all__ = ["TextSlices", "split_corpus", "tokenize_corpus"]


# ----------------------------------------------------------------------------- tokenize


_SEP = "\n\n"
# Contexts a paragraph break is found in; a chunking placement is used only if it
# reproduces the one-call encoding of all of them (checked once per tokenizer call).
_BOUNDARY_PROBES = ("word.\n\nNext", "word\n\nNext", "x)\n\n(y", "1\n\n2", "end:\n\n- item", "été\n\nÉté")


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False)
    return list(enc["input_ids"])


def _chunk_placement(tokenizer: Any) -> str | None:
    """Return "next" / "prev" (which chunk carries the separator) or None if neither is exact.

    GPT-2 style pre-tokenizers (SmolLM2) split "a.\\n\\nB" as "." "\\n" "\\n" "B", so the
    separator must start the next chunk; Llama-3 style ones glue newlines to punctuation
    (".\\n\\n"), so it must end the previous chunk. Probing makes this tokenizer-agnostic.
    """
    whole = _ids(tokenizer, list(_BOUNDARY_PROBES))
    for placement in ("next", "prev"):
        parts: list[str] = []
        for probe in _BOUNDARY_PROBES:
            left, right = probe.split(_SEP)
            parts += [left, _SEP + right] if placement == "next" else [left + _SEP, right]
        split_ids = _ids(tokenizer, parts)
        if all(split_ids[2 * i] + split_ids[2 * i + 1] == w for i, w in enumerate(whole)):
            return placement
    return None


def tokenize_corpus(text: str, tokenizer: Any, paragraphs_per_chunk: int = 256) -> torch.LongTensor:
    """Tokenize ``text`` into one 1-D LongTensor, without special tokens (no BOS/EOS).

    The ids equal ``tokenizer(text, add_special_tokens=False)`` (no BOS: perplexity
    windows are cut from a stream). For speed and to avoid max-length warnings on a
    1M-token string, the text is cut into chunks of ~``paragraphs_per_chunk`` paragraphs
    and tokenized as one batch. Cuts are made only at a bare "\\n\\n" between two
    non-space characters, on the side of the separator that the probe in
    :func:`_chunk_placement` shows to be exact for this tokenizer; if no side is exact
    the text is tokenized in one call.
    """
    if not text:
        return torch.zeros(0, dtype=torch.long)
    placement = _chunk_placement(tokenizer) if text.count(_SEP) >= paragraphs_per_chunk else None
    if placement is None:
        return torch.tensor(_ids(tokenizer, [text])[0], dtype=torch.long)
    cuts = [m.start() for m in re.finditer(r"(?<=\S)\n\n(?=\S)", text)]
    chunks: list[str] = []
    pos = 0
    for cut in cuts[paragraphs_per_chunk - 1::paragraphs_per_chunk]:
        at = cut if placement == "next" else cut + len(_SEP)
        chunks.append(text[pos:at])
        pos = at
    chunks.append(text[pos:])
    flat = [t for ids in _ids(tokenizer, chunks) for t in ids]
    return torch.tensor(flat, dtype=torch.long)


# ----------------------------------------------------------------------------- split


@dataclass
class TextSlices:
    """Calibration and evaluation windows cut from one token stream, plus where they came from.

    ``calibration``: (n, calib_seq_len) random windows inside ``[0, calib_region_end)``.
    ``evaluation``: (m, eval_seq_len) contiguous non-overlapping windows covering
    ``[eval_offset, eval_offset + m * eval_seq_len)``, with ``eval_offset >= calib_region_end``.
    """

    calibration: torch.LongTensor
    evaluation: torch.LongTensor
    calib_starts: tuple[int, ...] = ()
    calib_region_end: int = 0
    eval_offset: int = 0
    total_tokens: int = 0
    seed: int = 0
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_end(self) -> int:
        return self.eval_offset + int(self.evaluation.numel())

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for result files (source, offsets, sizes, seed)."""
        n, cl = (tuple(self.calibration.shape) + (0, 0))[:2]
        m, el = (tuple(self.evaluation.shape) + (0, 0))[:2]
        return {
            "source": self.source,
            "total_tokens": self.total_tokens,
            "seed": self.seed,
            "calibration": {"samples": int(n), "seq_len": int(cl), "region": [0, self.calib_region_end],
                            "starts": list(self.calib_starts)},
            "evaluation": {"windows": int(m), "seq_len": int(el), "tokens": int(m * el),
                           "region": [self.eval_offset, self.eval_end]},
            **self.extra,
        }


def split_corpus(
    ids: torch.Tensor,
    *,
    calib_samples: int,
    calib_seq_len: int,
    eval_tokens: int,
    eval_seq_len: int,
    seed: int = 0,
    eval_offset: int | None = None,
    calib_region_tokens: int | None = None,
    calib_fraction: float = 0.3,
    source: str | None = None,
) -> TextSlices:
    """Cut disjoint calibration and evaluation windows out of a 1-D token stream.

    The four sizes have no defaults here: `DataConfig` (prune_env/context.py) is their one home, so a
    caller cannot silently cut windows of other sizes than the env's.

    Calibration (Wanda style): ``calib_samples`` windows with seeded random starts
    (``torch.Generator().manual_seed(seed)``) inside the calibration region
    ``[0, C)``. Windows may overlap each other, as in Wanda.

    Evaluation (WikiText-2 protocol): ``eval_tokens // eval_seq_len`` contiguous,
    non-overlapping windows starting at ``eval_offset``.

    Region boundary ``C``: ``calib_region_tokens`` if given; else ``eval_offset`` if
    given; else ``calib_fraction`` (30 %) of the corpus, shrunk when needed so the
    evaluation slice fits, but never below one calibration window. The evaluation slice
    defaults to start right at ``C``. Calibration and evaluation therefore never share a
    token, so a pruned model is never evaluated on its calibration text.
    """
    if ids.dim() != 1:
        raise ValueError(f"split_corpus expects 1-D token ids, got shape {tuple(ids.shape)}")
    for name, v in (("calib_seq_len", calib_seq_len), ("eval_seq_len", eval_seq_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if calib_samples < 0:
        raise ValueError(f"calib_samples must be >= 0, got {calib_samples}")
    if eval_tokens < eval_seq_len:
        raise ValueError(f"eval_tokens ({eval_tokens}) must be at least one window of eval_seq_len ({eval_seq_len})")
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")

    ids = ids.to(torch.long)
    total = int(ids.numel())
    n_eval = eval_tokens // eval_seq_len
    eval_len = n_eval * eval_seq_len
    calib_min = calib_seq_len if calib_samples > 0 else 0

    def too_small(needed: int, detail: str, room: int) -> ValueError:
        """`room`: the tokens the evaluation slice could have, so the message gives the largest eval_tokens."""
        most = f"eval_tokens <= {room // eval_seq_len * eval_seq_len}, " if room >= eval_seq_len else ""
        return ValueError(
            f"corpus too small: {source or 'the text'} needs at least {needed} tokens ({detail}) but has {total}. "
            f"Use {most}a longer text source or fewer/shorter windows."
        )

    if calib_region_tokens is not None:
        region_end = int(calib_region_tokens)
    elif eval_offset is not None:
        region_end = int(eval_offset)
    else:
        if total < calib_min + eval_len:
            raise too_small(calib_min + eval_len,
                            f"calibration region >= {calib_min} + evaluation {n_eval} x {eval_seq_len}",
                            total - max(calib_min, calib_samples * calib_seq_len))
        region_end = max(calib_min, min(int(total * calib_fraction), total - eval_len))
    start_eval = region_end if eval_offset is None else int(eval_offset)

    if region_end < calib_min:
        raise ValueError(f"calibration region [0, {region_end}) is shorter than one calibration window ({calib_seq_len})")
    if start_eval < region_end:
        raise ValueError(f"eval_offset ({start_eval}) lies inside the calibration region [0, {region_end})")
    if start_eval + eval_len > total:
        raise too_small(start_eval + eval_len, f"evaluation starts at {start_eval} and needs {n_eval} x {eval_seq_len}",
                        total - start_eval)
    if calib_samples * calib_seq_len > region_end:  # more windows than the region holds only repeats its text
        raise ValueError(
            f"calib_samples={calib_samples} x calib_seq_len={calib_seq_len} = {calib_samples * calib_seq_len} "
            f"calibration tokens do not fit in the calibration region of {source or 'the text'} ({region_end} of its "
            f"{total} tokens): use calib_samples <= {region_end // calib_seq_len}, or a longer text")

    if calib_samples > 0:
        gen = torch.Generator().manual_seed(int(seed))
        starts = torch.randint(0, region_end - calib_seq_len + 1, (calib_samples,), generator=gen)
        calibration = torch.stack([ids[s:s + calib_seq_len] for s in starts.tolist()])
        calib_starts = tuple(int(s) for s in starts.tolist())
    else:
        calibration = torch.zeros(0, calib_seq_len, dtype=torch.long)
        calib_starts = ()
    evaluation = ids[start_eval:start_eval + eval_len].reshape(n_eval, eval_seq_len).clone()
    return TextSlices(
        calibration=calibration,
        evaluation=evaluation,
        calib_starts=calib_starts,
        calib_region_end=region_end,
        eval_offset=start_eval,
        total_tokens=total,
        seed=int(seed),
        source=source,
    )
