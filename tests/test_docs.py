"""The documentation a newcomer reads: README.md stays a short user's guide whose links all resolve.

Every number in README.md links to a study folder under docs/results/ whose README names the command that
made it, so a link that points nowhere breaks that chain; these checks fail on a moved folder, a renamed
heading or a README that grew back into a lab notebook.
"""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STUDY_READMES = sorted((ROOT / "docs" / "results").rglob("README.md"))
MAX_README_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HISTORY = re.compile(r"\bsessions?[ -]\d+|\bsession's\b|\bround \d+\b", re.IGNORECASE)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the markdown headings of `text` (lower case, punctuation dropped, spaces -> '-')."""
    anchors = set()
    for line in text.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file whose target file or heading does not exist."""
    text = path.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(target)
    return broken


def test_heading_anchors_follow_githubs_rule():
    assert heading_anchors("## Quickstart: `python train.py`\n# What it is, and why") == {
        "quickstart-python-trainpy", "what-it-is-and-why"}


def test_broken_links_finds_a_missing_file_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "there.md").write_text("# Real heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](there.md) [b](missing.md) [c](there.md#real-heading) [d](there.md#nope) "
                   "[e](#local) [f](https://example.com/x)\n## Local\n")
    assert broken_links(doc) == ["missing.md", "there.md#nope"]


@pytest.mark.parametrize("path", [README, *STUDY_READMES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} links to files or headings that do not exist"


def test_readme_is_a_short_guide_whose_results_live_in_study_folders():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail to docs/results/<study>/"
    assert (ROOT / "docs" / "results" / "README.md") in STUDY_READMES, "docs/results/README.md (the index) is missing"
    assert lines[3].startswith("make demo ") and lines[4].startswith("make test "), \
        "README.md must open with the two commands, make demo and make test"


def test_readme_and_configs_tell_no_history():
    """Session and round numbers belong in git history and study folders, not in the guide or the configs."""
    for path in [README, *sorted((ROOT / "configs").glob("*.yaml"))]:
        hits = [line for line in path.read_text().splitlines() if HISTORY.search(line)]
        assert hits == [], f"{path.relative_to(ROOT)} narrates history: {hits[:3]}"


def test_front_door_plays_current_ids():
    """gym.make warns when a newer version of an id is registered: the README's example and the demo must not."""
    demo = load_script("demo")  # importing it registers the ids

    registered = [env_id for env_id in gym.registry if env_id.startswith("prune_env/LayerPrune-v")]
    newest = max(registered, key=lambda env_id: int(env_id.rsplit("-v", 1)[1]))
    assert demo.ENV_ID == newest
    made = re.findall(r'gym\.make\("(?:prune_env:)?(prune_env/[A-Za-z]+-v\d+)"', README.read_text())
    assert made, "README.md has no gym.make example"
    for env_id in made:
        name, version = env_id.rsplit("-v", 1)
        versions = [int(other.rsplit("-v", 1)[1]) for other in gym.registry if other.startswith(name + "-v")]
        assert int(version) == max(versions), f"README.md plays {env_id}, an id Gymnasium calls out of date"


def test_the_policy_env_factory_warns_nothing():
    """make_env is how every policy plays (the demo's PPO row too): its [-1, 1] rescaling must not warn."""
    import warnings

    from prune_env.envs.factory import make_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make_env("prune_env/LayerPrune-v1", model="tiny-llama", fidelity="proxy")
    env.close()
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (1,), env.action_space.dtype)


RESEARCH = "Use it in your research"
# what each SmolLM2 run of a README snippet becomes in the check: the tiny model, its data and surrogate
TINY = {'model="smollm2-135m"': 'model="tiny-llama", data=TINY_DATA',
        'fidelity="surrogate"': 'fidelity="surrogate", surrogate=TINY_SURROGATE'}


def section(text: str, heading: str) -> str:
    """The text of the `## heading` section (its ### subsections included)."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_research_section_snippets_run_on_a_tiny_model(tiny_data, tmp_path, monkeypatch, capsys):
    from tests.tiny_surrogate import write_tiny_dataset

    surrogate = tmp_path / "tiny-surrogate.jsonl"
    write_tiny_dataset(surrogate, tiny_data).close()
    text = section(README.read_text(), RESEARCH)
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert snippets, f"README.md's {RESEARCH!r} section has no python snippet"
    monkeypatch.chdir(ROOT)
    for snippet in snippets:
        code = snippet
        for old, new in TINY.items():
            code = code.replace(old, new)
        assert "smollm2" not in code.lower(), "a README snippet runs SmolLM2 that the check cannot substitute"
        exec(compile(code, f"README.md ({RESEARCH})", "exec"), {"TINY_DATA": tiny_data,
                                                                 "TINY_SURROGATE": str(surrogate)})
    assert capsys.readouterr().out  # the snippets print what they measured
    for script in re.findall(r"python (scripts/\w+\.py)", text):
        assert (ROOT / script).is_file(), f"README.md runs {script}, which does not exist"


def test_readme_reference_table_is_the_packaged_one():
    from prune_env.envs import reference

    assert reference.markdown() in section(README.read_text(), RESEARCH), \
        "README.md's reference table differs from prune_env/envs/reference_scores.json: paste reference.markdown()"
