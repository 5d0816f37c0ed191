"""The built-in task: multi-step integer addition/subtraction with worked solutions.

Every problem carries a difficulty ``(digits, ops, carries)``: operand width, number of
operations, and how many column carries/borrows the whole computation needs. Difficulty is
per prompt and spans a ladder of levels, so a small model solves the easiest almost always
and the hardest almost never — the spread of acceptance rates that GVM allocates over.

Generation is deterministic in ``seed``. The train and test splits are disjoint by
construction: a problem belongs to the test split exactly when a hash of its text falls in a
fixed bucket, whatever the seeds and sizes.

Worked solutions come in two styles. ``in-order`` applies the operations left to right, so
each problem has one correct worked solution. ``any-order`` writes the signed terms in
every order whose running totals stay non-negative (``3 + 5 - 2`` may also be worked as
``5 - 2 = 3, 3 + 3 = 6``): one, picked by a hash of the problem, as ``solution`` and the rest
as ``other_solutions``. A policy warm-started on all of them knows several correct paths per
problem, so its correct responses differ from one another. The problems, answers and splits
are the same in both styles.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from gvm_mega.data.records import Prompt

Split = Literal["train", "test"]
SolutionStyle = Literal["in-order", "any-order"]
SOLUTION_STYLES: tuple[str, ...] = ("in-order", "any-order")

TEST_BUCKETS = 8  # one problem text in 8 belongs to the test split


@dataclass(frozen=True)
class Difficulty:
    """``digits``: operand width; ``ops``: operations; ``carries``: carries+borrows needed."""

    digits: int
    ops: int
    carries: int


# Easiest first and non-decreasing on every knob; a tiny model's accuracy should fall from
# ~1 to ~0 along the ladder.
LEVELS: tuple[Difficulty, ...] = (
    Difficulty(1, 1, 0),
    Difficulty(1, 2, 0),
    Difficulty(1, 2, 1),
    Difficulty(2, 2, 1),
    Difficulty(2, 2, 2),
    Difficulty(2, 3, 3),
    Difficulty(3, 3, 3),
    Difficulty(3, 3, 4),
    Difficulty(4, 3, 5),
    Difficulty(4, 4, 7),
)


@dataclass(frozen=True)
class ArithmeticProblem:
    problem: str
    solution: str
    answer: int
    level: int
    difficulty: Difficulty
    carries: int
    other_solutions: tuple[str, ...] = ()  # further correct paths (``any-order`` only)


def column_carries(a: int, b: int, op: str) -> int:
    """Carries (for ``+``) or borrows (for ``-``, with ``a >= b >= 0``) of column arithmetic."""
    count = carry = 0
    while a or b:
        da, db = a % 10, b % 10
        if op == "+":
            carry = 1 if da + db + carry >= 10 else 0
        else:
            carry = 1 if da - db - carry < 0 else 0
        count += carry
        a //= 10
        b //= 10
    return count


def _operand(rng: random.Random, digits: int) -> int:
    low = 1 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10 ** digits - 1)


def _draw(rng: random.Random, d: Difficulty) -> tuple[list[int], list[str], int]:
    """One expression at difficulty ``d``; the carry count may miss the target."""
    operands = [_operand(rng, d.digits)]
    ops: list[str] = []
    value = operands[0]
    carries = 0
    for _ in range(d.ops):
        b = _operand(rng, d.digits)
        op = rng.choice("+-")
        if op == "-" and b > value:
            op = "+" if value < (1 if d.digits == 1 else 10 ** (d.digits - 1)) else "-"
            if op == "-":
                b = rng.randint(1 if d.digits == 1 else 10 ** (d.digits - 1), value)
        carries += column_carries(value, b, op)
        value = value + b if op == "+" else value - b
        operands.append(b)
        ops.append(op)
    return operands, ops, carries


def make_problem(rng: random.Random, level: int, *, attempts: int = 200,
                 solutions: SolutionStyle = "in-order") -> ArithmeticProblem:
    """A problem at ``LEVELS[level]``, drawn until its carry count hits the target; its worked
    solution in the style ``solutions`` (the style does not change what ``rng`` draws)."""
    d = LEVELS[level]
    best = None
    for _ in range(attempts):
        operands, ops, carries = _draw(rng, d)
        if best is None or abs(carries - d.carries) < abs(best[2] - d.carries):
            best = (operands, ops, carries)
        if carries == d.carries:
            break
    operands, ops, carries = best
    expression = str(operands[0]) + "".join(f" {op} {b}" for op, b in zip(ops, operands[1:]))
    problem = f"Compute {expression}."
    terms = [operands[0]] + [b if op == "+" else -b for op, b in zip(ops, operands[1:])]
    others: list[list[int]] = []
    if solutions == "any-order":
        orders = valid_orders(terms)
        terms = random.Random(f"gvm-mega-arithmetic-order:{problem}").choice(orders)
        others = [order for order in orders if order != terms]
    elif solutions != "in-order":
        raise ValueError(f"unknown solution style {solutions!r}; expected one of {SOLUTION_STYLES}")
    return ArithmeticProblem(problem=problem, solution=worked_solution(terms),
                             answer=sum(terms), level=level, difficulty=d, carries=carries,
                             other_solutions=tuple(worked_solution(o) for o in others))


def worked_solution(terms: Sequence[int]) -> str:
    """``Step k: total op |term| = new`` lines adding ``terms`` in order, then the boxed total."""
    lines = []
    value = terms[0]
    for step, term in enumerate(terms[1:], start=1):
        new = value + term
        lines.append(f"Step {step}: {value} {'+' if term >= 0 else '-'} {abs(term)} = {new}")
        value = new
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return "\n".join(lines)


def valid_orders(terms: Sequence[int]) -> list[list[int]]:
    """The distinct orders of ``terms`` that start with a positive term and keep every running
    total non-negative (the written order always qualifies), sorted."""
    valid = []
    for order in sorted(set(itertools.permutations(terms))):
        if order[0] > 0 and all(t >= 0 for t in itertools.accumulate(order)):
            valid.append(list(order))
    return valid


_STEP = re.compile(r"^Step \d+:(.*)$", re.MULTILINE)
_EQUATION = re.compile(r"\s*(-?\d+) ([+-]) (-?\d+) = (-?\d+)\s*")


def steps_hold(response: str) -> bool:
    """Whether every ``Step k: a op b = c`` line of a response is a true equation that starts
    from the previous step's result.

    A small policy often reaches the right answer through wrong steps (``8 - 1 = 6``, then the
    right total); an answer-only reward reinforces those. Responses without step lines hold.
    """
    previous = None
    for step in _STEP.finditer(response):
        m = _EQUATION.fullmatch(step.group(1))
        if m is None:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if (a + b if op == "+" else a - b) != c or (previous is not None and a != previous):
            return False
        previous = c
    return True


def split_of(problem_text: str) -> Split:
    """The split a problem text belongs to (a fixed hash bucket marks the test split)."""
    digest = hashlib.blake2b(problem_text.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def generate_problems(n: int, *, seed: int = 0, split: Split = "train",
                      levels: Optional[Sequence[int]] = None,
                      solutions: SolutionStyle = "in-order") -> list[ArithmeticProblem]:
    """``n`` distinct problems of ``split``, levels drawn uniformly from ``levels``, with
    worked solutions in the style ``solutions``."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    levels = list(range(len(LEVELS))) if levels is None else list(levels)
    bad = [lv for lv in levels if not 0 <= lv < len(LEVELS)]
    if not levels or bad:
        raise ValueError(f"arithmetic levels must be in 0..{len(LEVELS) - 1}, got {levels}")
    # Splits use different streams so the test split is not a filtered copy of train's order.
    rng = random.Random(f"gvm-mega-arithmetic:{split}:{seed}")
    seen: set[str] = set()
    out: list[ArithmeticProblem] = []
    misses = 0  # in a row: a long run of repeats means the levels hold too few problems
    while len(out) < n:
        problem = make_problem(rng, rng.choice(levels), solutions=solutions)
        if problem.problem in seen or split_of(problem.problem) != split:
            misses += 1
            if misses > 20_000:
                raise ValueError(f"cannot draw {n} distinct {split} problems from levels "
                                 f"{levels} (found {len(out)}): ask for fewer problems or "
                                 f"more levels")
            continue
        misses = 0
        seen.add(problem.problem)
        out.append(problem)
    return out


def arithmetic_prompts(n: int, *, seed: int = 0, split: Split = "train",
                       levels: Optional[Sequence[int]] = None,
                       solutions: SolutionStyle = "in-order") -> list[Prompt]:
    """The task as :class:`Prompt` records (ids ``arithmetic-<split>-<seed>-<index>``)."""
    return [
        Prompt(id=f"arithmetic-{split}-{seed}-{i}", problem=p.problem, answer=p.answer,
               solution=p.solution, other_solutions=p.other_solutions,
               meta={"level": p.level, "digits": p.difficulty.digits, "ops": p.difficulty.ops,
                     "carries": p.carries})
        for i, p in enumerate(generate_problems(n, seed=seed, split=split, levels=levels,
                                                solutions=solutions))
    ]
