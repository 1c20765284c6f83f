"""agents.llm parsing, prompts and candidates: reading answers, repairing them, bounding what is echoed."""

from __future__ import annotations

from llm_fakes import FakeIterativeEnv

from agents.llm.candidates import zscore_greedy
from agents.llm.memory import Memory
from agents.llm.parsing import (MAX_ANSWER_CHARS, MAX_PARSE_CHARS, extract_json_object, parse_move,
                                read_answer_allocation, truncate_text)
from agents.llm.prompts import reask_messages, user_prompt


def test_extract_json_object_tolerates_prose_fences_and_think():
    text = '<think>maybe {"units": ["x"]}</think>Sure:\n```json\n{"units": ["a"], "rationale": "b {c}"}\n```'
    obj, err = extract_json_object(text)
    assert err is None and obj == {"units": ["a"], "rationale": "b {c}"}
    obj, err = extract_json_object('{"units": ["a",]')
    assert obj is None and "malformed" in err
    assert extract_json_object("")[1] == "the answer was empty"
    assert extract_json_object("no json here")[0] is None


def test_extract_json_object_refuses_huge_and_deeply_nested_answers():
    obj, err = extract_json_object("{" * (MAX_PARSE_CHARS + 1))
    assert obj is None and str(MAX_PARSE_CHARS) in err and "short JSON object" in err
    obj, err = extract_json_object("[" * 100_000 + '{"units": ["a"]}')  # deeper than the recursion limit
    assert obj is None and "no valid JSON object" in err  # only the first brackets are tried as the start
    assert extract_json_object("<think>" * 20_000 + '{"units": ["a"]}') == ({"units": ["a"]}, None)
    assert extract_json_object('<THINK>{"units": ["x"]}</think> {"units": ["a"]}') == ({"units": ["a"]}, None)


def test_parse_move_repairs():
    env = FakeIterativeEnv()
    env.sparsity[3] = env.max_sparsity  # capped
    table = env.profile_table()
    text = ('ok {"units": ["model.layers.1", "bogus", "MODEL.LAYERS.1", 5, "#2", "model.layers.3", '
            '"model.layers.0", "model.layers.4"], "rationale": "cheap ones"}')
    p = parse_move(text, table, max_sparsity=env.max_sparsity, max_units=4)
    assert p.ok, p.error
    assert p.units == ["model.layers.1", "model.layers.5", "model.layers.2", "model.layers.0"]
    notes = " | ".join(p.repairs)
    assert "dropped unknown unit 'bogus'" in notes
    assert "removed duplicate model.layers.1" in notes
    assert "index 5" in notes and "already at the max sparsity" in notes and "truncated 5 units" in notes
    assert p.rationale == "cheap ones"

    bad = parse_move('{"units": ["nope", "model.layers.3"]}', table, max_sparsity=0.5, max_units=4)
    assert not bad.ok and "no valid unit remained" in bad.error
    assert "no \"units\"" in parse_move('{"foo": 1}', table, max_sparsity=0.5, max_units=4).error
    lst = parse_move('["model.layers.2"]', table, max_sparsity=0.5, max_units=4)
    assert lst.ok and lst.units == ["model.layers.2"]


def test_repair_notes_quote_a_long_unit_name_only_briefly():
    table = FakeIterativeEnv().profile_table()
    parsed = parse_move('{"units": ["' + "z" * 100_000 + '"]}', table, max_sparsity=0.5, max_units=4)
    assert not parsed.ok and len(parsed.error) < 400 and "[truncated:" in parsed.error


def test_parse_allocation_needs_most_units():
    table = FakeIterativeEnv().profile_table()
    values, _, _, err = read_answer_allocation('{"ratios": {"model.layers.0": 0.2}}', table)
    assert values is None and "only 1 of 6" in err


def test_zscore_greedy_respects_cap_and_blocked():
    env = FakeIterativeEnv()
    env.sparsity[1] = env.max_sparsity
    t = env.profile_table()
    assert zscore_greedy(t, 0.5, 2) == ["model.layers.5", "model.layers.4"]
    assert zscore_greedy(t, 0.5, 2, blocked={"model.layers.5"}) == ["model.layers.4", "model.layers.2"]


def test_reask_echoes_a_bounded_answer_and_error():
    huge = "x" * 5_000_000
    messages = reask_messages([{"role": "user", "content": "q"}], huge, "bad " + huge, "Reply again.")
    echoed, error = messages[-2]["content"], messages[-1]["content"]
    assert echoed.startswith("x" * MAX_ANSWER_CHARS) and echoed.endswith("[truncated: 4998000 more characters]")
    assert len(error) < MAX_ANSWER_CHARS + 200 and "[truncated:" in error and error.endswith("Reply again.")
    assert truncate_text("short") == "short"


def test_user_prompt_without_memory():
    text = user_prompt(FakeIterativeEnv().profile_table(), Memory(4), max_units=3, iteration=1,
                       global_sparsity=0.0, target=0.5, max_sparsity=0.9, increment=0.05)
    assert "none yet" in text and "budget left 50.00%" in text and "at most 3 units" in text


def test_numbers_too_large_for_a_float_are_a_malformed_answer_not_a_crash():
    table = FakeIterativeEnv().profile_table()
    big = "1" * 400  # float(int(big)) raises OverflowError; int() of > 4300 digits raises ValueError
    for text in (f'{{"units": [{big}]}}', f'{{"units": {big}}}', f'{{"units": [-{"9" * 5000}]}}'):
        parsed = parse_move(text, table, max_sparsity=0.5, max_units=4)
        assert not parsed.ok and "integer of" in parsed.error and "digits" in parsed.error
    for text in (f'{{"ratios": {{"model.layers.0": {big}}}}}', f'{{"ratios": [{big}, 0.1, 0.1, 0.1, 0.1, 0.1]}}'):
        ratios, _, _, error = read_answer_allocation(text, table)
        assert ratios is None and "integer of 400 digits" in error
    # numbers that do fit a float but are no unit: dropped, with a note
    parsed = parse_move('{"units": [1e400, "#' + "9" * 5000 + '", 3.0, 4]}', table, max_sparsity=0.5, max_units=4)
    assert parsed.units == ["model.layers.3", "model.layers.4"]
    assert any("unknown index inf" in r for r in parsed.repairs)
    ratios, _, repairs, error = read_answer_allocation('{"ratios": ["' + big + '", 1e400, 0.1, 0.1, 0.1, 0.1]}', table)
    assert error is None and ratios[0] == ratios[1] == 0.0 and sum("non-numeric" in r for r in repairs) == 2
