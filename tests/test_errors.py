"""One catalog of error words (executor.errors.ErrorCode), used everywhere and documented once."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import executor.errors
from executor.errors import ErrorCode, ExecutorError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "errors.md"
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def test_errors_every_code_has_one_section_in_the_docs_and_every_section_is_a_code() -> None:
    headings = re.findall(r"^### (\S+)$", DOCS.read_text(), flags=re.M)
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)
    assert set(headings) == {c.value for c in ErrorCode}, set(headings) ^ {
        c.value for c in ErrorCode
    }


def test_errors_every_exception_has_a_code_from_the_catalog() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(executor.errors, inspect.isclass)
        if issubclass(c, ExecutorError)
    ]
    assert len(classes) >= 10
    for cls in classes:
        assert isinstance(cls.code, ErrorCode), cls
    own = [c.code for c in classes if "code" in vars(c)]
    assert len(own) == len(set(own)), own  # no two exceptions share a word


def _bare_codes(path: Path) -> list[str]:
    """String literals equal to an error code, outside the enums that define a word, the
    ``Literal[...]`` types that spell the wire's words for a type checker, and the log calls
    whose event names the same thing."""
    codes = {c.value for c in ErrorCode}
    tree = ast.parse(path.read_text(), str(path))
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Name) and b.id == "StrEnum" for b in node.bases
        ):
            allowed.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Subscript) and (
            (isinstance(node.value, ast.Name) and node.value.id == "Literal")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "Literal")
        ):
            allowed.update(id(n) for n in ast.walk(node))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _LOG_METHODS
            and node.args
        ):
            allowed.add(id(node.args[0]))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in codes
        and id(node) not in allowed
    ]


def test_errors_no_module_writes_an_error_code_as_a_bare_string() -> None:
    found = [
        hit
        for path in sorted((ROOT / "executor").rglob("*.py"))
        if path.name != "errors.py" or path.parent.name != "executor"
        for hit in _bare_codes(path)
    ]
    assert not found, "use executor.errors.ErrorCode:\n" + "\n".join(found)
