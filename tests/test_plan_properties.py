"""Property tests of the planner (SPEC §2) on generated DAGs and build specs.

The DAGs come from ``executor.testing`` and are acyclic by construction; the expectations are
recomputed here from the spec itself (declared edges, a reference topological sort), not read
back from the planner.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from executor import (
    BuildSpec,
    CycleError,
    JobState,
    Plan,
    Readiness,
    WaitSpec,
    build_plan,
    parse_build_text,
)
from executor.testing import build_specs, dags, step_keys

Dag = Mapping[str, Sequence[str]]

# A terminal outcome the driver reports for a job it was handed: (state, soft_failed).
OUTCOMES = [
    (JobState.PASSED, False),
    (JobState.FAILED, False),
    (JobState.FAILED, True),
    (JobState.TIMED_OUT, False),
    (JobState.CANCELED, False),
]


def _spec_from_dag(dag: Dag, keys: Sequence[str]) -> BuildSpec:
    """A build with one ``true`` step per DAG node, written to the file in ``keys`` order."""
    return BuildSpec.model_validate(
        {"steps": [{"key": k, "command": "true", "depends_on": list(dag[k])} for k in keys]}
    )


def _reference_order(dag: Dag, file_order: Sequence[str]) -> list[str]:
    """Lexicographically smallest topological order by file position, the slow obvious way."""
    placed: list[str] = []
    done: set[str] = set()
    while len(placed) < len(file_order):
        key = next(k for k in file_order if k not in done and set(dag[k]) <= done)
        placed.append(key)
        done.add(key)
    return placed


def _assert_topological(order: Sequence[str], dag: Dag) -> None:
    assert sorted(order) == sorted(dag)
    position = {k: n for n, k in enumerate(order)}
    for key, prerequisites in dag.items():
        for p in prerequisites:
            assert position[p] < position[key], f"{p!r} must come before {key!r}"


def _declared_edges(spec: BuildSpec) -> dict[str, set[str]]:
    """Each command step's prerequisites from its own fields (depends_on, builds_in)."""
    return {
        step.key: set(step.depends_on) | ({step.builds_in} if step.builds_in else set())
        for step in spec.command_steps
    }


def _ancestors(plan: Plan, key: str) -> set[str]:
    seen: set[str] = set()
    stack = list(plan.prerequisites(key))
    while stack:
        k = stack.pop()
        if k not in seen:
            seen.add(k)
            stack.extend(plan.prerequisites(k))
    return seen


@settings(max_examples=60, deadline=None)
@given(build_specs(max_steps=25))
def test_plan_order_puts_every_prerequisite_first_and_each_job_once(spec: BuildSpec) -> None:
    plan = build_plan(spec)
    keys = [s.key for s in spec.command_steps]
    assert sorted(plan.order) == sorted(keys)
    assert len(set(plan.order)) == len(plan.order) == len(keys)
    placed: set[str] = set()
    for key in plan.order:
        assert set(plan.prerequisites(key)) <= placed, f"{key!r} comes before a prerequisite"
        placed.add(key)
    # The planner's edges include everything the spec declares, barriers included: a step
    # after a wait runs after (depends at least transitively on) every step before it.
    for key, declared in _declared_edges(spec).items():
        assert declared <= set(plan.prerequisites(key))
    before_wait: set[str] = set()
    since_wait: set[str] = set()
    for item in spec.steps:
        if isinstance(item, WaitSpec):
            before_wait |= since_wait
            since_wait = set()
        else:
            assert before_wait <= _ancestors(plan, item.key), item.key
            since_wait.add(item.key)


@settings(max_examples=60, deadline=None)
@given(build_specs(max_steps=25))
def test_plan_levels_are_longest_prerequisite_chains(spec: BuildSpec) -> None:
    plan = build_plan(spec)
    level_of: dict[str, int] = {}
    for n, keys in enumerate(plan.levels):
        assert keys, f"level {n} is empty"
        for key in keys:
            assert key not in level_of, f"{key!r} is in two levels"
            level_of[key] = n
    assert sorted(level_of) == sorted(plan.order)
    for key in plan.order:
        prerequisites = plan.prerequisites(key)
        expected = 1 + max(level_of[p] for p in prerequisites) if prerequisites else 0
        assert level_of[key] == expected == plan.level(key)
    path = plan.critical_path
    assert len(path) == len(plan.levels)
    assert [level_of[k] for k in path] == list(range(len(path)))
    for earlier, later in pairwise(path):
        assert earlier in plan.prerequisites(later)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_plan_order_is_smallest_topological_order_by_file_position(data: st.DataObject) -> None:
    dag = data.draw(dags(max_nodes=25, keys=step_keys()), label="dag")
    shuffled = data.draw(st.permutations(list(dag)), label="file order")

    generated = build_plan(_spec_from_dag(dag, list(dag)))
    _assert_topological(generated.order, dag)
    # The generated order is already topological, so the smallest order is the file order.
    assert list(generated.order) == list(dag)

    plan = build_plan(_spec_from_dag(dag, shuffled))
    _assert_topological(plan.order, dag)
    assert list(plan.order) == _reference_order(dag, shuffled)
    assert build_plan(_spec_from_dag(dag, shuffled)).order == plan.order


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_plan_prerequisites_and_dependents_are_listed_in_plan_order(data: st.DataObject) -> None:
    dag = data.draw(dags(max_nodes=15, keys=step_keys()), label="dag")
    shuffled = data.draw(st.permutations(list(dag)), label="file order")
    plan = build_plan(_spec_from_dag(dag, shuffled))
    position = {k: n for n, k in enumerate(plan.order)}
    for key in dag:
        assert plan.position(key) == position[key]
        assert plan.prerequisites(key) == tuple(sorted(dag[key], key=position.__getitem__))
        dependents = [k for k in dag if key in dag[k]]
        assert plan.dependents(key) == tuple(sorted(dependents, key=position.__getitem__))


_PRINT_ORDER = """
import json, sys
from executor import load_plan
print(json.dumps(load_plan(sys.argv[1]).order))
"""


def test_plan_order_is_independent_of_the_hash_seed(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    keys = [f"k{n}" for n in range(200)]
    dag = {k: rng.sample(keys[:n], min(n, rng.randint(0, 4))) for n, k in enumerate(keys)}
    file_order = list(keys)
    rng.shuffle(file_order)  # not already topological: the planner has to sort
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(_spec_from_dag(dag, file_order).to_data(), sort_keys=False))

    outputs = []
    for seed in ("1", "4242"):
        child = subprocess.run(
            [sys.executable, "-c", _PRINT_ORDER, str(path)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(json.loads(child.stdout))
    assert outputs[0] == outputs[1]
    assert outputs[0] == _reference_order(dag, file_order)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_plan_back_edge_is_reported_as_a_real_cycle(data: st.DataObject) -> None:
    dag = data.draw(dags(min_nodes=2, max_nodes=20, keys=step_keys()), label="dag")
    pairs = [(u, v) for v in dag for u in sorted(_dag_ancestors(dag, v))]
    assume(pairs)
    u, v = data.draw(st.sampled_from(pairs), label="back edge")  # v depends on u transitively
    modified = {k: list(p) for k, p in dag.items()}
    modified[u].append(v)
    spec = _spec_from_dag(modified, list(dag))

    try:
        build_plan(spec)
    except CycleError as exc:
        error = exc
    else:
        raise AssertionError(f"no CycleError after adding {u!r} depends on {v!r}")

    cycle = error.cycle
    assert len(cycle) >= 3
    assert cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "the cycle repeats a step"
    for a, b in pairwise(cycle):
        assert b in modified[a], f"{a!r} does not depend directly on {b!r}"
    # The original DAG had no cycle, so a real one has to use the added edge.
    assert (u, v) in set(pairwise(cycle))
    assert "dependency cycle:" in str(error)
    assert " -> ".join(cycle) in str(error)


def _dag_ancestors(dag: Dag, key: str) -> set[str]:
    seen: set[str] = set()
    stack = list(dag[key])
    while stack:
        k = stack.pop()
        if k not in seen:
            seen.add(k)
            stack.extend(dag[k])
    return seen


@settings(max_examples=60, deadline=None)
@given(build_specs(max_steps=15))
def test_load_round_trips_a_generated_spec_through_yaml_and_json(spec: BuildSpec) -> None:
    data = spec.to_data()
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    assert parse_build_text(text) == spec
    assert parse_build_text(json.dumps(data), json_format=True) == spec


@settings(max_examples=100, deadline=None)
@given(build_specs(max_steps=20), st.data())
def test_cursor_agrees_with_plan_readiness(spec: BuildSpec, data: st.DataObject) -> None:
    plan = build_plan(spec)
    cursor = plan.frontier()
    handed_out: set[str] = set()
    running: list[str] = []

    def hand_out() -> None:
        for key in cursor.ready():
            assert key not in handed_out, f"{key!r} handed out twice"
            assert key not in cursor.statuses
            decision = plan.readiness(key, cursor.statuses)
            assert decision.readiness is Readiness.READY, (key, decision)
            handed_out.add(key)
            running.append(key)
        # Every other unfinished job is waiting: nothing ready was held back, nothing missed
        # its cascade.
        for key in plan.order:
            if key not in handed_out and key not in cursor.statuses:
                decision = plan.readiness(key, cursor.statuses)
                assert decision.readiness is Readiness.WAITING, (key, decision)

    hand_out()
    while running:
        key = data.draw(st.sampled_from(running), label="finishes")
        running.remove(key)
        state, soft = data.draw(st.sampled_from(OUTCOMES), label=f"outcome of {key!r}")
        settled = cursor.done(key, state, soft_failed=soft)
        assert cursor.statuses[key].state is state
        for s in settled:
            assert s.key not in handed_out, f"{s.key!r} was settled after it started"
            assert cursor.statuses[s.key].state is s.state
            decision = plan.readiness(s.key, cursor.statuses)
            expected = {JobState.SKIPPED: Readiness.SKIP, JobState.CANCELED: Readiness.CANCEL}
            assert s.state in expected, s
            assert decision.readiness is expected[s.state], (s, decision)
            assert decision.cause == s.cause
        hand_out()

    assert not cursor.is_active()
    assert set(cursor.statuses) == set(plan.order)
    for key, status in cursor.statuses.items():
        assert status.state.is_terminal
        if status.state is JobState.SKIPPED:
            cause = cursor.statuses[status.cause] if status.cause else None
            assert cause is not None and cause.is_hard_failure, (key, status, cause)
            assert status.cause in _ancestors(plan, key)
        elif key not in handed_out:  # canceled in cascade
            assert status.state is JobState.CANCELED
            assert status.cause in _ancestors(plan, key)
            assert cursor.statuses[status.cause].state is JobState.CANCELED
