"""Rules for the tests themselves, checked on their syntax trees (tests/**/*.py):

- every `pytest.raises(...)` has `match=`: the exception type alone passes on a different error;
- no `sleep(...)` to wait for something: a test waits on the condition with a deadline
  (tests/waiting.py `wait_until`). The few sleeps that are a poll interval or the behaviour under test
  are allowed by name below, each with its reason.

Code inside string literals (driver scripts run in a subprocess) is not parsed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

# (file, innermost function) -> why its sleep is not a wait
SLEEP_ALLOWED = {
    ("tests/waiting.py", "wait_until"): "the poll interval of the condition wait",
    ("tests/conftest.py", "wait_for_port"): "the poll interval of a wait for a port, with a deadline",
    ("tests/integration/test_object_store_budget.py", "most_blocks_ahead"): "the slow consumer under test",
    ("tests/integration/test_train_faults.py", "kill_a_worker_after_the_first_checkpoint"):
        "the fault's timing under test: the kill lands half way through an epoch",
}


def _name(func: ast.expr) -> str:
    """`pytest.raises` -> "pytest.raises", `sleep` -> "sleep"."""
    return ast.unparse(func)


class _Finder(ast.NodeVisitor):
    def __init__(self):
        self.functions: list[str] = []
        self.raises_without_match: list[int] = []
        self.sleeps: list[tuple[int, str]] = []  # (line, innermost function or "")

    def _visit_function(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_Call(self, node: ast.Call):
        name = _name(node.func)
        if name in ("pytest.raises", "raises") and not any(k.arg == "match" for k in node.keywords):
            self.raises_without_match.append(node.lineno)
        if name == "sleep" or name.endswith(".sleep"):
            self.sleeps.append((node.lineno, self.functions[-1] if self.functions else ""))
        self.generic_visit(node)


def find(source: str) -> _Finder:
    finder = _Finder()
    finder.visit(ast.parse(source))
    return finder


def _sources() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


@pytest.fixture(scope="module")
def found() -> dict[str, _Finder]:
    return {str(path.relative_to(REPO)): find(path.read_text()) for path in _sources()}


def test_every_pytest_raises_has_a_match(found):
    missing = [f"{path}:{line}" for path, finder in found.items() for line in finder.raises_without_match]
    assert not missing, f"pytest.raises without match= (say which error): {missing}"


def test_no_test_sleeps_to_wait(found):
    sleeps = [f"{path}:{line} (in {function or 'module'})" for path, finder in found.items()
              for line, function in finder.sleeps if (path, function) not in SLEEP_ALLOWED]
    assert not sleeps, f"sleep used to wait; use waiting.wait_until with the condition instead: {sleeps}"


def test_each_allowed_sleep_is_still_there(found):
    """An entry whose sleep is gone would silently allow the next one written there."""
    used = {(path, function) for path, finder in found.items() for _, function in finder.sleeps}
    assert set(SLEEP_ALLOWED) <= used, sorted(set(SLEEP_ALLOWED) - used)


def test_the_checks_see_what_they_look_for():
    finder = find(
        "import time, pytest\n"
        "from time import sleep\n"
        "def helper():\n"
        "    time.sleep(1)\n"
        "    with pytest.raises(ValueError):\n"
        "        pass\n"
        "    with pytest.raises(\n"
        "        ValueError,\n"
        "        match='x',\n"
        "    ):\n"
        "        sleep(2)\n"
        "SCRIPT = 'time.sleep(3)'\n"
    )
    assert finder.raises_without_match == [5]
    assert finder.sleeps == [(4, "helper"), (11, "helper")]
