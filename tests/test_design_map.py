"""docs/DESIGN.md's module map agrees with the code (scripts/design_map.py)."""

from __future__ import annotations

from script_modules import load_script

design_map = load_script("design_map")


def test_design_md_module_map_matches_the_code():
    text = design_map.DESIGN.read_text(encoding="utf-8")
    problems = design_map.disagreements(text, design_map.modules())
    assert not problems, "docs/DESIGN.md's module map is out of date:\n" + "\n".join(problems)


def test_the_check_names_a_new_a_removed_and_a_grown_module(tmp_path):
    (tmp_path / "prune_env").mkdir()
    (tmp_path / "prune_env" / "env.py").write_text("a\nb\nc\n")
    (tmp_path / "prune_env" / "new.py").write_text("x\n")
    actual = design_map.modules(tmp_path)
    assert actual == {"prune_env/env.py": 3, "prune_env/new.py": 1}
    text = "| `prune_env/env.py` | 2 | the env |\n| `prune_env/gone.py` | 5 | gone |\n"
    problems = design_map.disagreements(text, actual)
    assert any(p.startswith("prune_env/new.py: not in the module map") for p in problems)
    assert any(p.startswith("prune_env/gone.py: in the module map but not in the code") for p in problems)
    assert any(p.startswith("prune_env/env.py: the map says 2 lines, the file has 3") for p in problems)
    refreshed = design_map.refresh_counts(text, actual)
    assert "| `prune_env/env.py` | 3 | the env |" in refreshed
    assert design_map.disagreements(refreshed + "| `prune_env/new.py` | 1 | new |\n", actual) == [
        "prune_env/gone.py: in the module map but not in the code (remove its row)"]
