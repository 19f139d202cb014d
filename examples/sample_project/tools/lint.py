"""A small, dependency-free lint for the sample project, with a JUnit XML report.

    python3 sample_project/tools/lint.py [--junit PATH] [--warn-exit CODE] PATH...

Errors (the file does not compile, tab indentation, trailing whitespace, a line longer than
$LINT_MAX_LINE, default 100, no final newline) exit 1. TODO comments are warnings: they exit with
--warn-exit (default 0), so a build can treat "warnings only" as a soft failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_TODO_COMMENT = re.compile(r"#\s*TODO\b")


def check_file(path: Path, max_line: int) -> tuple[list[str], list[str]]:
    """Return (errors, warnings) for one Python file, each as `path:line: message`."""
    source = path.read_text(encoding="utf-8")
    errors: list[str] = []
    warnings: list[str] = []
    try:
        compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        errors.append(f"{path}:{exc.lineno}: does not compile: {exc.msg}")
    if source and not source.endswith("\n"):
        errors.append(f"{path}: no newline at end of file")
    for number, line in enumerate(source.splitlines(), start=1):
        where = f"{path}:{number}"
        if line.startswith("\t"):
            errors.append(f"{where}: tab indentation")
        if line != line.rstrip():
            errors.append(f"{where}: trailing whitespace")
        if len(line) > max_line:
            errors.append(f"{where}: line is {len(line)} characters, limit is {max_line}")
        if _TODO_COMMENT.search(line):
            warnings.append(f"{where}: TODO marker")
    return errors, warnings


def write_junit(report: Path, results: dict[Path, tuple[list[str], list[str]]]) -> None:
    failures = sum(1 for errors, _ in results.values() if errors)
    suite = ET.Element("testsuite", name="lint", tests=str(len(results)), failures=str(failures))
    for path, (errors, warnings) in results.items():
        case = ET.SubElement(suite, "testcase", classname="lint", name=str(path))
        if errors:
            ET.SubElement(case, "failure", message=f"{len(errors)} error(s)").text = "\n".join(
                errors
            )
        if warnings:
            ET.SubElement(case, "system-out").text = "\n".join(warnings)
    report.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(report, encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lint")
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--junit", type=Path, help="also write a JUnit XML report here")
    parser.add_argument("--warn-exit", type=int, default=0, help="exit code for warnings only")
    args = parser.parse_args(argv)
    max_line = int(os.environ.get("LINT_MAX_LINE", "100"))

    files = sorted(
        file
        for root in args.paths
        for file in ([root] if root.is_file() else root.rglob("*.py"))
        if "__pycache__" not in file.parts
    )
    results = {file: check_file(file, max_line) for file in files}
    errors = [e for errs, _ in results.values() for e in errs]
    warnings = [w for _, warns in results.values() for w in warns]
    for message in errors:
        print(f"error: {message}")
    for message in warnings:
        print(f"warning: {message}")
    print(f"lint: {len(files)} files, {len(errors)} errors, {len(warnings)} warnings")
    if args.junit is not None:
        write_junit(args.junit, results)
    if errors:
        return 1
    return args.warn_exit if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
