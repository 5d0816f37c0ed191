"""The built-in arithmetic task: exact answers, worked steps, difficulty, seeds, splits."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from gvm_mega.data import LEVELS, arithmetic_prompts, generate_problems
from gvm_mega.data.arithmetic import column_carries, split_of, valid_orders
from gvm_mega.reward import extract_answer

STEP = re.compile(r"^Step (\d+): (\d+) ([+-]) (\d+) = (-?\d+)$")


@pytest.fixture(scope="module")
def problems():
    return generate_problems(1500, seed=11)


def test_column_carries_by_hand():
    assert column_carries(47, 38, "+") == 1
    assert column_carries(999, 1, "+") == 3
    assert column_carries(123, 456, "+") == 0
    assert column_carries(100, 1, "-") == 2
    assert column_carries(85, 12, "-") == 0
    assert column_carries(52, 17, "-") == 1


def test_answers_and_worked_steps_are_exact(problems):
    for p in problems:
        expression = p.problem.removeprefix("Compute ").removesuffix(".")
        assert eval(expression) == p.answer  # noqa: S307 — digits and +/- only
        lines = p.solution.split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}."
        assert extract_answer(p.solution) == str(p.answer)
        steps = [STEP.match(line) for line in lines[:-1]]
        assert all(steps) and len(steps) == p.difficulty.ops
        value = int(expression.split()[0])
        carries = 0
        for k, m in enumerate(steps, start=1):
            n, a, op, b, result = m.groups()
            assert int(n) == k and int(a) == value
            expected = value + int(b) if op == "+" else value - int(b)
            assert int(result) == expected >= 0
            carries += column_carries(value, int(b), op)
            value = expected
        assert value == p.answer and carries == p.carries


def test_difficulty_knobs(problems):
    by_level = {lv: [p for p in problems if p.level == lv] for lv in range(len(LEVELS))}
    assert all(by_level.values())
    for lv, items in by_level.items():
        d = LEVELS[lv]
        for p in items:
            operands = [int(t) for t in re.findall(r"\d+", p.problem)]
            assert len(operands) == d.ops + 1
            assert all(len(str(x)) == d.digits for x in operands)
        hit = sum(p.carries == d.carries for p in items) / len(items)
        assert hit >= 0.95, (lv, hit)
    # the ladder never gets easier on any knob, and the work written out grows
    for easier, harder in zip(LEVELS, LEVELS[1:]):
        assert easier != harder
        assert (easier.digits, easier.ops, easier.carries) <= (harder.digits, harder.ops, harder.carries)
        assert easier.digits <= harder.digits and easier.ops <= harder.ops
        assert easier.carries <= harder.carries
    mean_len = [sum(len(p.solution) for p in by_level[lv]) / len(by_level[lv])
                for lv in range(len(LEVELS))]
    assert all(a < b for a, b in zip(mean_len, mean_len[1:])), mean_len
    assert mean_len[0] * 3 < mean_len[-1]


def test_levels_spread_and_restriction(problems):
    counts = Counter(p.level for p in problems)
    assert set(counts) == set(range(len(LEVELS)))
    # levels with room for many distinct problems are drawn about uniformly
    big = [counts[lv] for lv in range(3, len(LEVELS))]
    assert max(big) < 2 * min(big)
    only = generate_problems(100, seed=1, levels=[2, 9])
    assert {p.level for p in only} == {2, 9}
    with pytest.raises(ValueError, match="levels must be in 0..9"):
        generate_problems(5, levels=[10])


def test_deterministic_by_seed_with_disjoint_test_split(problems):
    again = generate_problems(1500, seed=11)
    assert [(p.problem, p.solution, p.answer) for p in again] == \
        [(p.problem, p.solution, p.answer) for p in problems]
    assert [p.problem for p in generate_problems(50, seed=12)] != [p.problem for p in problems[:50]]
    # a shorter run is a prefix of a longer one: ids stay stable when the size changes
    assert [p.problem for p in generate_problems(40, seed=11)] == [p.problem for p in problems[:40]]
    test = generate_problems(300, seed=11, split="test")
    assert len({p.problem for p in problems}) == len(problems)
    assert not {p.problem for p in problems} & {p.problem for p in test}
    assert all(split_of(p.problem) == "test" for p in test)
    assert all(split_of(p.problem) == "train" for p in problems)
    # disjoint whatever the seeds: test split of another seed still avoids this train split
    other_test = generate_problems(300, seed=99, split="test")
    assert not {p.problem for p in problems} & {p.problem for p in other_test}
    with pytest.raises(ValueError, match="unknown split"):
        generate_problems(3, split="dev")


def test_prompt_records():
    prompts = arithmetic_prompts(30, seed=4, split="test")
    assert [p.id for p in prompts] == [f"arithmetic-test-4-{i}" for i in range(30)]
    for p in prompts:
        assert isinstance(p.answer, int) and p.solution.endswith(f"\\boxed{{{p.answer}}}.")
        assert set(p.meta) == {"level", "digits", "ops", "carries"}


def test_steps_hold_accepts_true_chained_steps_only(problems):
    from gvm_mega.data import steps_hold

    assert all(steps_hold(p.solution) for p in problems)  # every worked solution holds
    assert steps_hold("Step 1: 3 - 9 = -6\nStep 2: -6 + 12 = 6\nThe answer is \\boxed{6}.")
    assert steps_hold("The answer is \\boxed{4}.")  # no worked steps: nothing to refuse
    # the right answer through a false step (what an answer-only reward reinforces)
    assert not steps_hold("Step 1: 8 - 1 = 6\nStep 2: 6 - 2 = 4\nThe answer is \\boxed{4}.")
    # true equations that do not continue from the previous result
    assert not steps_hold("Step 1: 4 + 3 = 7\nStep 2: 6 - 2 = 4\nThe answer is \\boxed{4}.")
    # a step line that is not an equation
    assert not steps_hold("Step 1: 3 + 7 =  + 1 = 2: 14\nThe answer is \\boxed{14}.")


def test_any_order_solutions_are_true_paths_of_the_same_problems(problems):
    """Same problems and answers as in-order; each worked solution adds the problem's signed
    terms in some order, never below zero, and the orders vary over problems."""
    from gvm_mega.data import steps_hold

    any_order = generate_problems(1500, seed=11, solutions="any-order")
    assert [(p.problem, p.answer, p.level) for p in any_order] == \
           [(p.problem, p.answer, p.level) for p in problems]
    reordered = 0
    for fixed, p in zip(problems, any_order):
        expression = p.problem.removeprefix("Compute ").removesuffix(".").split()
        terms = [int(expression[0])] + [int(b) if op == "+" else -int(b)
                                         for op, b in zip(expression[1::2], expression[2::2])]
        lines = p.solution.split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}." and steps_hold(p.solution)
        steps = [STEP.match(line) for line in lines[:-1]]
        assert all(steps) and len(steps) == p.difficulty.ops
        used = [int(steps[0].group(2))] + [int(m.group(4)) * (1 if m.group(3) == "+" else -1)
                                           for m in steps]
        assert sorted(used) == sorted(terms) and used[0] > 0
        assert all(int(m.group(5)) >= 0 for m in steps)
        reordered += p.solution != fixed.solution
    assert reordered > len(problems) // 2
    for p in any_order[:200]:  # the other correct paths: every valid order once, all true
        paths = (p.solution,) + p.other_solutions
        assert len(set(paths)) == len(paths) and all(steps_hold(s) for s in paths)
        assert {extract_answer(s) for s in paths} == {str(p.answer)}
    assert max(len(p.other_solutions) for p in any_order) >= 5
    assert all(not p.other_solutions for p in problems)
    # the order is a function of the problem text: other seeds and sizes agree on shared problems
    other = {p.problem: p.solution for p in generate_problems(1500, seed=12, solutions="any-order")}
    shared = [p for p in any_order if p.problem in other]
    assert len(shared) > 20 and all(other[p.problem] == p.solution for p in shared)
    with pytest.raises(ValueError, match="unknown solution style 'random'"):
        generate_problems(3, solutions="random")


def test_valid_orders_by_hand():
    assert valid_orders([3, 5, -2]) == [[3, -2, 5], [3, 5, -2], [5, -2, 3], [5, 3, -2]]
    assert valid_orders([1, -1]) == [[1, -1]]
    assert valid_orders([2, 2]) == [[2, 2]]  # equal terms: one distinct order
    assert valid_orders([4, -3, -1]) == [[4, -3, -1], [4, -1, -3]]
