"""The import layering of STYLE.md: errors -> model -> states -> plan -> store -> run -> service
-> api -> web -> cli.

Walks every module's imports (the AST, also imports inside functions) and holds the line: a
module imports only its own layer or lower ones, the API only the store and below (not the
runner, not the service: it declares the Protocol it needs, ``api/service.py``), the web view
likewise (it acts through the API's protocol), and only the web view and the command line
import the API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "executor"

LAYERS = {  # module-name prefix -> layer; the longest matching prefix wins
    "executor.errors": 0,
    "executor.model": 1,
    "executor.states": 2,
    "executor.plan": 3,
    "executor.load": 3,
    "executor.render": 3,
    "executor.testing": 3,
    "executor.store": 4,
    "executor.run": 5,
    "executor.service": 6,
    "executor.api": 7,
    "executor.web": 8,
    "executor.cli": 9,
    "executor.__main__": 9,
    "executor": 9,  # the package facade re-exports everything
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("executor"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("executor"))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_module_imports_only_its_layer_or_lower(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    for imported in _imports(path):
        assert _layer(imported) <= layer, f"{module} (layer {layer}) imports {imported}"
        if module.startswith(("executor.api", "executor.web")):
            assert not imported.startswith(("executor.run", "executor.service")), (
                f"{module} imports {imported}"
            )
        if imported.startswith("executor.api"):
            assert module.startswith(("executor.api", "executor.web", "executor.cli")), (
                module,
                imported,
            )
        if imported == "executor.cli" or imported.startswith("executor.cli."):
            assert module == "executor.__main__" or module.startswith("executor.cli"), module


def test_the_walk_sees_every_layer() -> None:
    assert {_layer(_module_name(p)) for p in MODULES} == set(LAYERS.values())


def test_the_command_line_loads_the_web_stack_only_for_serve() -> None:
    """Every command's module is imported at start (click registers them): one that imported
    FastAPI at module level would make `run`, `plan` and the rest pay for it (about a second on
    a small machine). Only `serve`, `submit` and the API load it, when they run."""
    import subprocess
    import sys

    web = "('fastapi', 'httpx', 'starlette', 'uvicorn', 'jinja2')"
    code = f"import sys, executor.cli; print(sorted(m for m in {web} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
