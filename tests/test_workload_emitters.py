"""The ninja and make emitters of the benchmark workloads run every step once, in order.

Each test writes a small generated graph for the real tool, runs it, and reads back the order
in which the steps appended their keys to a file. No timing is involved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.workload import (
    Graph,
    listing_order,
    make_graph,
    render_json,
    step_command,
    to_makefile,
    to_ninja,
)

Emitter = Callable[[Graph, str], str]
STEPS = 30
RECORD = "echo {key} >> order.txt"
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def _assert_ran_in_order(graph: Graph, order_file: Path) -> None:
    ran = order_file.read_text(encoding="utf-8").split()
    assert sorted(ran) == sorted(graph.keys)  # every step, exactly once
    position = {key: i for i, key in enumerate(ran)}
    for key, deps in zip(graph.keys, graph.deps, strict=True):
        for dep in deps:
            assert position[graph.keys[dep]] < position[key], f"{key} ran before {dep}"


@pytest.mark.parametrize("shape", ["wide", "chain", "layered", "diamond"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ninja_runs_every_step_once_after_its_prerequisites(
    tmp_path: Path, shape: str, shuffle: bool
) -> None:
    _require("ninja")
    graph = make_graph(shape, STEPS, seed=5, width=4)
    order = listing_order(STEPS, shuffle=shuffle, seed=5)
    (tmp_path / "build.ninja").write_text(to_ninja(graph, RECORD, order), encoding="utf-8")
    subprocess.run(["ninja", "-C", str(tmp_path), "-j", "4"], check=True, capture_output=True)
    _assert_ran_in_order(graph, tmp_path / "order.txt")


@pytest.mark.parametrize("shape", ["wide", "chain", "layered", "diamond"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_makefile_runs_every_step_once_after_its_prerequisites(
    tmp_path: Path, shape: str, shuffle: bool
) -> None:
    _require("make")
    graph = make_graph(shape, STEPS, seed=5, width=4)
    order = listing_order(STEPS, shuffle=shuffle, seed=5)
    (tmp_path / "Makefile").write_text(to_makefile(graph, RECORD, order), encoding="utf-8")
    subprocess.run(
        ["make", "-C", str(tmp_path), "-s", "-j", "4", "all"],
        check=True,
        capture_output=True,
        env=MAKE_ENV,
    )
    _assert_ran_in_order(graph, tmp_path / "order.txt")


def test_ninja_reruns_every_step_on_the_next_invocation(tmp_path: Path) -> None:
    # The outputs are never created, so a second build is a full build again.
    _require("ninja")
    graph = make_graph("layered", STEPS, width=4)
    (tmp_path / "build.ninja").write_text(to_ninja(graph, RECORD), encoding="utf-8")
    for _ in range(2):
        subprocess.run(["ninja", "-C", str(tmp_path)], check=True, capture_output=True)
    ran = (tmp_path / "order.txt").read_text(encoding="utf-8").split()
    assert sorted(ran) == sorted(graph.keys * 2)


@pytest.mark.parametrize("emit", [to_ninja, to_makefile])
def test_emitters_pass_dollar_signs_to_the_shell_unchanged(tmp_path: Path, emit: Emitter) -> None:
    tool = "ninja" if emit is to_ninja else "make"
    _require(tool)
    graph = make_graph("chain", 3)
    command = "X=1; echo {key}-$X-${X} >> order.txt"
    name = "build.ninja" if tool == "ninja" else "Makefile"
    (tmp_path / name).write_text(emit(graph, command), encoding="utf-8")
    env = MAKE_ENV if tool == "make" else None
    subprocess.run([tool, "-C", str(tmp_path)], check=True, capture_output=True, env=env)
    ran = (tmp_path / "order.txt").read_text(encoding="utf-8").split()
    assert ran == [f"{key}-1-1" for key in graph.keys]


def test_step_command_replaces_only_the_key_placeholder() -> None:
    assert step_command("echo {key} ${HOME} {other}", "s00001") == "echo s00001 ${HOME} {other}"


def test_json_workload_carries_the_per_step_command() -> None:
    graph = make_graph("chain", 2)
    text = render_json(graph, RECORD, listing_order(2))
    assert "echo s00001 >> order.txt" in text
    assert "echo s00002 >> order.txt" in text


@pytest.mark.parametrize("emit", [to_ninja, to_makefile])
def test_emitters_reject_a_multi_line_command(emit: Emitter) -> None:
    with pytest.raises(ValueError, match="one line"):
        emit(make_graph("wide", 2), "true\ntrue")
