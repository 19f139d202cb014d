"""The build page's DAG layout (executor/web/layout.py), without a browser: every job and
edge is drawn, waits become barriers, edges point one way, nodes never overlap, the ordering
pass removes crossings it can, and big builds collapse by level."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.load import plan_build_text
from executor.model import BuildSpec
from executor.plan import EdgeKind, Plan, build_plan
from executor.testing import build_specs
from executor.web.layout import (
    Direction,
    Layout,
    NodeKind,
    count_crossings,
    layout_plan,
)


def _plan(steps: str) -> Plan:
    return plan_build_text(f"steps:\n{steps}", name="build.yml")


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _check_geometry(layout: Layout) -> None:
    boxes = [(n.x, n.y, n.width, n.height) for n in layout.nodes]
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlap(a, b), (a, b)
    for x, y, w, h in boxes:
        assert 0 <= x and x + w <= layout.width and 0 <= y and y + h <= layout.height
    axis = 0 if layout.direction is Direction.LR else 1
    for link in layout.links:
        along = [p[axis] for p in link.points]
        assert along == sorted(along) and along[0] < along[-1], link  # edges point one way


def test_layout_draws_every_job_and_every_edge_of_a_small_plan() -> None:
    plan = _plan(
        "  - {key: lint, command: x}\n"
        "  - {key: unit, command: x}\n"
        "  - {key: build, command: x, depends_on: [lint]}\n"
        "  - {key: deploy, command: x, depends_on: [build, unit]}\n"
    )
    layout = layout_plan(plan)
    assert {n.id for n in layout.nodes} == {"lint", "unit", "build", "deploy"}
    assert {(link.source, link.target) for link in layout.links} == {
        (e.source, e.target) for e in plan.edges
    }
    layers = {n.id: n.layer for n in layout.nodes}
    assert layers == {"lint": 0, "unit": 0, "build": 1, "deploy": 2}
    assert layout.node_of == {k: k for k in plan.order}
    _check_geometry(layout)


def test_layout_draws_a_wait_as_one_barrier_not_every_pair() -> None:
    before = "".join(f"  - {{key: b{i}, command: x}}\n" for i in range(5))
    after = "".join(f"  - {{key: a{i}, command: x}}\n" for i in range(4))
    plan = _plan(before + "  - wait\n" + after)
    assert sum(EdgeKind.WAIT in e.kinds for e in plan.edges) == 20
    layout = layout_plan(plan)
    (barrier,) = [n for n in layout.nodes if n.kind is NodeKind.BARRIER]
    ends = {(link.source, link.target) for link in layout.links}
    assert ends == {(f"b{i}", barrier.id) for i in range(5)} | {
        (barrier.id, f"a{i}") for i in range(4)
    }
    assert barrier.width < 10  # a bar between the groups, not a box
    _check_geometry(layout)


def test_layout_marks_a_wait_that_continues_on_failure_and_its_tolerant_edges() -> None:
    plan = _plan(
        "  - {key: a, command: x}\n  - {type: wait, continue_on_failure: true}\n"
        "  - {key: b, command: x}\n"
    )
    layout = layout_plan(plan)
    (barrier,) = [n for n in layout.nodes if n.kind is NodeKind.BARRIER]
    assert barrier.continue_on_failure
    assert all(link.tolerant for link in layout.links)


def test_layout_gives_a_distinct_barrier_to_each_wait() -> None:
    plan = _plan(
        "  - {key: a, command: x}\n  - wait\n  - {key: b, command: x}\n"
        "  - wait\n  - {key: c, command: x}\n"
    )
    layout = layout_plan(plan)
    barriers = [n.id for n in layout.nodes if n.kind is NodeKind.BARRIER]
    assert len(barriers) == 2
    assert [n.id for n in sorted(layout.nodes, key=lambda n: n.layer)] == [
        "a",
        barriers[0],
        "b",
        barriers[1],
        "c",
    ]


def test_layout_routes_a_long_edge_through_a_point_per_layer_it_crosses() -> None:
    plan = _plan(
        "  - {key: a, command: x}\n"
        "  - {key: b, command: x, depends_on: a}\n"
        "  - {key: c, command: x, depends_on: b}\n"
        "  - {key: d, command: x, depends_on: [c, a]}\n"
    )
    layout = layout_plan(plan)
    (long,) = [link for link in layout.links if (link.source, link.target) == ("a", "d")]
    assert len(long.points) == 4  # start, a bend in each of the two layers between, end
    _check_geometry(layout)


def test_layout_orders_layers_to_remove_the_crossings_plan_order_has() -> None:
    # In plan order x1 x2 over y2 y1 the two edges cross; the ordering pass uncrosses them.
    plan = _plan(
        "  - {key: x1, command: x}\n  - {key: x2, command: x}\n"
        "  - {key: y2, command: x, depends_on: x2}\n  - {key: y1, command: x, depends_on: x1}\n"
    )
    assert layout_plan(plan).crossings == 0


def test_layout_top_down_puts_layers_in_rows() -> None:
    plan = _plan("  - {key: a, command: x}\n  - {key: b, command: x, depends_on: a}\n")
    layout = layout_plan(plan, direction=Direction.TB)
    a, b = sorted(layout.nodes, key=lambda n: n.layer)
    assert a.x == b.x and a.y < b.y
    _check_geometry(layout)


def test_layout_collapses_a_big_plan_to_one_node_per_level() -> None:
    steps = "".join(f"  - {{key: s{i}, command: x}}\n" for i in range(40))
    steps += "".join(f"  - {{key: t{i}, command: x, depends_on: s{i % 40}}}\n" for i in range(60))
    plan = _plan(steps)
    layout = layout_plan(plan, collapse_over=50)
    assert layout.collapsed
    assert [(n.id, n.kind, len(n.members)) for n in layout.nodes] == [
        ("level:0", NodeKind.LEVEL, 40),
        ("level:1", NodeKind.LEVEL, 60),
    ]
    assert [(link.source, link.target) for link in layout.links] == [("level:0", "level:1")]
    assert set(layout.node_of) == set(plan.order)
    assert layout.node_of["t7"] == "level:1"


def test_layout_of_a_plan_with_no_jobs_is_empty() -> None:
    layout = layout_plan(_plan("  - wait\n"))
    assert (layout.nodes, layout.links) == ((), ())


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], 0),
        ([(0, 0), (1, 1)], 0),
        ([(0, 1), (1, 0)], 1),
        ([(0, 0), (0, 1)], 0),  # a shared end is not a crossing
        ([(0, 2), (1, 1), (2, 0)], 3),
        ([(0, 1), (1, 1)], 0),
    ],
)
def test_count_crossings_counts_exactly(pairs: list[tuple[int, int]], expected: int) -> None:
    assert count_crossings(pairs) == expected


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=20))
def test_count_crossings_matches_the_pairwise_definition(pairs: list[tuple[int, int]]) -> None:
    slow = sum(
        (a < c and b > d) or (a > c and b < d)
        for (a, b), (c, d) in itertools.combinations(pairs, 2)
    )
    assert count_crossings(pairs) == slow


@settings(max_examples=60, deadline=None)
@given(build_specs(max_steps=14, policies=False))
def test_layout_of_any_plan_draws_each_job_once_and_keeps_every_dependency(
    spec: BuildSpec,
) -> None:
    plan = build_plan(spec)
    layout = layout_plan(plan)
    jobs = [n for n in layout.nodes if n.kind is NodeKind.JOB]
    assert sorted(n.id for n in jobs) == sorted(plan.order)
    reach: dict[str, set[str]] = {n.id: set() for n in layout.nodes}
    for link in layout.links:
        reach[link.source].add(link.target)
    # every edge of the plan is drawn: directly or through its wait's barrier
    for edge in plan.edges:
        via = {edge.source} | reach[edge.source]
        assert edge.target in reach[edge.source] or any(
            edge.target in reach[b] for b in via if b.startswith("wait:")
        ), edge
    _check_geometry(layout)


def test_layout_of_a_dense_plan_is_collapsed_with_bounded_work() -> None:
    # 150 jobs, 5,049 edges: drawn in full it would need hundreds of thousands of bends (an
    # attacker's build file made the page cost minutes of CPU); it is drawn by level instead.
    chain = "".join(
        f"  - {{key: c{i}, command: x{', depends_on: c' + str(i - 1) if i else ''}}}\n"
        for i in range(50)
    )
    every = ", ".join(f"c{i}" for i in range(50))
    fans = "".join(f"  - {{key: f{i}, command: x, depends_on: [{every}]}}\n" for i in range(100))
    plan = _plan(chain + fans)
    assert len(plan.edges) == 49 + 100 * 50
    layout = layout_plan(plan)
    assert layout.collapsed and len(layout.nodes) == 51  # the chain's 50 levels, then the fans
    # the chain's 49, and one from each chain level to the fans' (49 of them arc beside the line)
    assert len(layout.links) == 49 + 50
    assert layout.hidden_links == 0
    assert set(layout.node_of) == set(plan.order)
    _check_geometry(layout)


def test_layout_of_levels_past_the_limit_draws_only_neighbouring_levels() -> None:
    steps = "  - {key: s0, command: x}\n" + "".join(
        f"  - {{key: s{i}, command: x, depends_on: [{', '.join(f's{j}' for j in range(i))}]}}\n"
        for i in range(1, 30)
    )
    plan = _plan(steps)  # every level depends on every earlier one: 435 level edges
    layout = layout_plan(plan, collapse_over=10, work_limit=100)
    assert layout.collapsed
    assert len(layout.links) == 29 and layout.hidden_links == 435 - 29
    _check_geometry(layout)
