"""Shared fixtures: an isolated cache, generated English text and facts, tiny data slices.

torch runs single-threaded: the tiny models are far too small to gain from threads, and on a shared
2-core machine thread contention makes them ~100x slower.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

_WORDS = {
    "subject": ["the system", "a package", "the server", "every user", "the network", "this service", "the kernel",
                "an administrator", "the mirror", "a developer", "the installer", "the database"],
    "verb": ["installs", "configures", "reads", "writes", "updates", "removes", "checks", "starts", "stops",
             "keeps", "stores", "downloads"],
    "object": ["the files", "a new version", "the settings", "several modules", "the log", "its keys",
               "the archive", "the daemon", "a backup", "the sources", "the cache", "the users"],
    "tail": ["every night", "after a reboot", "with care", "from the mirror", "on each machine", "in the background",
             "before the upgrade", "without a prompt", "when asked", "as root"],
}


def generated_text(paragraphs: int = 150, seed: int = 0) -> str:
    """Deterministic English-like prose (never the handbook: the user's cache is off limits)."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            parts = [rng.choice(_WORDS[k]) for k in ("subject", "verb", "object")]
            if rng.random() < 0.6:
                parts.append(rng.choice(_WORDS["tail"]))
            sentence = " ".join(parts)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!", "?"]))
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


FACT_ROWS = [
    ("The capital of France is", "Paris", ["Paris", "Madrid", "Rome", "Berlin"]),
    ("The capital of Spain is", "Madrid", ["Lisbon", "Madrid", "Paris", "Vienna"]),
    ("The chemical symbol for gold is", "Au", ["Ag", "Au", "Fe", "Cu"]),
    ("The chemical symbol for iron is", "Fe", ["Fe", "Au", "Pb", "Zn"]),
    ("Debian is a free operating", "system", ["system", "kernel", "desk", "table"]),
    ("The package manager installs", "software", ["software", "water", "music", "bread"]),
    ("Paris is a city in the continent of", "Europe", ["Asia", "Africa", "Europe", "America"]),
    ("The official currency of Germany is the", "euro", ["euro", "dollar", "yen", "pound"]),
    ("The capital of Italy is", "Rome", ["Rome", "Oslo", "Athens", "Cairo"]),
    ("Madrid is a city in the continent of", "Europe", ["America", "Europe", "Oceania", "Asia"]),
    ("The chemical symbol for silver is", "Ag", ["Cu", "Sn", "Ag", "Au"]),
    ("The capital of Portugal is", "Lisbon", ["Lisbon", "Madrid", "Dublin", "Prague"]),
]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point PRUNE_GYM_CACHE at a fresh folder for the whole session (profiles, dense metrics).

    The one thing tests may read from the user's cache is the Debian handbook text, which other
    test files use; it is linked (read-only use) into the scratch cache so it is never re-fetched.
    """
    from prune_env.files import cache_root

    user_handbook = cache_root() / "text" / "debian-handbook.txt"
    scratch = tmp_path_factory.mktemp("prune-gym-cache")
    old = os.environ.get("PRUNE_GYM_CACHE")
    os.environ["PRUNE_GYM_CACHE"] = str(scratch)
    if user_handbook.is_file():
        linked = cache_root() / "text" / "debian-handbook.txt"
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.symlink_to(user_handbook)
    yield scratch
    if old is None:
        os.environ.pop("PRUNE_GYM_CACHE", None)
    else:
        os.environ["PRUNE_GYM_CACHE"] = old


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "generated.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    lines = [json.dumps({"prompt": p, "answer": a, "choices": c, "relation": "test"}) for p, a, c in FACT_ROWS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data(text_file: Path, facts_file: Path) -> dict:
    """DataConfig values for LayerPrune-v0 on a tiny model: a few hundred tokens of everything."""
    return {"text": str(text_file), "facts": str(facts_file), "calib_samples": 4, "calib_seq_len": 32,
            "eval_tokens": 256, "eval_seq_len": 64, "n_facts": 10, "grad_samples": 2}


@pytest.fixture(scope="session")
def calib_ids(text_file: Path) -> torch.Tensor:
    """(4, 32) token windows of the generated text under the tiny tokenizer."""
    from prune_env.data.windows import tokenize_corpus
    from prune_env.tiny import tiny_tokenizer

    ids = tokenize_corpus(text_file.read_text(encoding="utf-8"), tiny_tokenizer())
    return ids[: 4 * 32].reshape(4, 32).clone()
