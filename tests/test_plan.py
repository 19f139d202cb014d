"""The planner's readiness and cascade rules (SPEC §2), on small hand-written builds."""

from __future__ import annotations

import pytest

from executor import InternalError, JobState, Plan, Readiness, Settled, plan_build_text

CHAIN = """
steps:
  - {key: build, command: make}
  - {key: test, command: make test, depends_on: build}
  - {key: package, command: make dist, depends_on: test}
  - {key: report, command: make report, depends_on: test, allow_dependency_failure: true}
  - {type: wait, continue_on_failure: true}
  - {key: cleanup, command: rm -rf out}
"""


def _plan(text: str = CHAIN) -> Plan:
    return plan_build_text(text)


def test_plan_order_levels_and_critical_path() -> None:
    plan = _plan()
    assert plan.order == ("build", "test", "package", "report", "cleanup")
    assert plan.levels == (("build",), ("test",), ("package", "report"), ("cleanup",))
    assert plan.critical_path == ("build", "test", "package", "cleanup")
    assert plan.dependents("test") == ("package", "report", "cleanup")


def test_plan_ties_start_in_file_order_even_when_listed_backwards() -> None:
    plan = _plan(
        "steps:\n  - {key: z, command: x, depends_on: [b, a]}\n"
        "  - {key: b, command: x}\n  - {key: a, command: x}\n"
    )
    assert plan.order == ("b", "a", "z")


def test_plan_graph_is_a_networkx_digraph_of_the_same_edges() -> None:
    plan = _plan()
    graph = plan.graph
    assert list(graph.nodes) == list(plan.order)
    assert set(graph.edges) == {(e.source, e.target) for e in plan.edges}
    assert graph.edges["package", "cleanup"]["tolerant"] is True
    assert graph.nodes["report"]["level"] == 2


def test_cursor_skip_names_the_root_cause_not_the_nearest_skipped_job() -> None:
    cursor = _plan().frontier()
    assert cursor.ready() == ("build",)
    settled = cursor.done("build", JobState.FAILED)
    assert sorted(settled, key=lambda s: s.key) == [
        Settled("package", JobState.SKIPPED, "build"),
        Settled("test", JobState.SKIPPED, "build"),
    ]
    assert cursor.ready() == ("report",)  # allow_dependency_failure: runs once test is terminal
    assert cursor.done("report", JobState.PASSED) == ()
    assert cursor.ready() == ("cleanup",)  # continue_on_failure barrier


def test_cursor_allow_dependency_failure_runs_after_a_failure() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    cursor.done("build", JobState.PASSED)
    assert cursor.ready() == ("test",)
    assert cursor.done("test", JobState.TIMED_OUT) == (
        Settled("package", JobState.SKIPPED, "test"),
    )
    assert cursor.ready() == ("report",)


def test_cursor_soft_failure_satisfies_dependents() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    assert cursor.done("build", JobState.FAILED, soft_failed=True) == ()
    assert cursor.ready() == ("test",)


def test_cursor_cancel_cascades_even_through_tolerant_edges() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    settled = cursor.done("build", JobState.CANCELED)
    assert {s.key: s.state for s in settled} == {
        "test": JobState.CANCELED,
        "package": JobState.CANCELED,
        "report": JobState.CANCELED,
        "cleanup": JobState.CANCELED,
    }
    assert not cursor.is_active()


def test_cursor_strict_wait_skips_everything_after_a_failure() -> None:
    cursor = _plan(
        "steps:\n  - {key: a, command: x}\n  - wait\n  - {key: b, command: y}\n"
    ).frontier()
    cursor.ready()
    assert cursor.done("a", JobState.FAILED) == (Settled("b", JobState.SKIPPED, "a"),)


def test_cursor_rejects_a_second_report_and_non_terminal_states() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    with pytest.raises(InternalError, match="not terminal"):
        cursor.done("build", JobState.RUNNING)
    cursor.done("build", JobState.PASSED)
    with pytest.raises(InternalError, match="called twice"):
        cursor.done("build", JobState.PASSED)


def test_plan_readiness_recomputes_from_statuses() -> None:
    from executor import JobStatus

    plan = _plan()
    assert plan.readiness("test", {}).readiness is Readiness.WAITING
    assert plan.readiness("build", {}).readiness is Readiness.READY
    skipped = {
        "build": JobStatus(JobState.FAILED),
        "test": JobStatus(JobState.SKIPPED, cause="build"),
    }
    decision = plan.readiness("package", skipped)
    assert (decision.readiness, decision.cause) == (Readiness.SKIP, "build")
    assert plan.readiness("report", skipped).readiness is Readiness.READY


def test_plan_unknown_key_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="no step with key 'nope' in this plan"):
        _plan().step("nope")
