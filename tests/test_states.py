"""The job transition table and the build roll-up (SPEC §2), checked against the SPEC text."""

from __future__ import annotations

import pytest

from executor import (
    TRANSITIONS,
    BuildState,
    Event,
    InvalidTransitionError,
    JobState,
    JobStatus,
    roll_up,
    transition,
)
from executor.states import ACTIVE_BUILD_STATES, _table

_NON_TERMINAL = ("pending", "scheduled", "assigned", "running", "canceling", "timing_out")
_TERMINAL = ("passed", "failed", "skipped", "canceled", "timed_out")

# SPEC §2's table, row by row, as plain words: (from, event) -> to.
EXPECTED: dict[tuple[str, str], str] = {
    ("pending", "ready"): "scheduled",
    ("pending", "cancel_requested"): "canceled",
    ("scheduled", "cancel_requested"): "canceled",
    ("assigned", "cancel_requested"): "canceled",
    ("scheduled", "slot_acquired"): "assigned",
    ("assigned", "started"): "running",
    ("running", "exited_zero"): "passed",
    ("running", "exited_nonzero"): "failed",
    ("running", "retry_scheduled"): "scheduled",
    ("running", "timeout_expired"): "timing_out",
    ("running", "cancel_requested"): "canceling",
    ("timing_out", "process_gone"): "timed_out",
    ("timing_out", "retry_scheduled"): "scheduled",
    ("canceling", "process_gone"): "canceled",
    ("pending", "dependency_failed"): "skipped",
    **{(state, "build_timeout"): "timed_out" for state in _NON_TERMINAL},
    ("assigned", "executor_lost"): "failed",
    ("running", "executor_lost"): "failed",
    # Extension rows (resume of an abandoned build), documented in the README:
    ("failed", "resumed"): "pending",
    ("canceled", "resumed"): "pending",
    ("pending", "reused"): "passed",
    # Extension row (SPEC §7): a final attempt whose artifacts could not be kept.
    ("running", "artifact_upload_failed"): "failed",
}

_NOT_IN_TABLE = [
    (state, event)
    for state in JobState
    for event in Event
    if (state.value, event.value) not in EXPECTED
]


def _jobs(*states: JobState | tuple[JobState, bool]) -> list[JobStatus]:
    out = []
    for s in states:
        state, soft = s if isinstance(s, tuple) else (s, False)
        out.append(JobStatus(state, soft_failed=soft))
    return out


def test_states_are_harmonts_with_the_spec_terminal_set() -> None:
    assert sorted(s.value for s in JobState) == sorted(_NON_TERMINAL + _TERMINAL)
    assert sorted(s.value for s in JobState if s.is_terminal) == sorted(_TERMINAL)


def test_build_states_are_terminal_only_once_decided() -> None:
    assert sorted(s.value for s in BuildState if s.is_terminal) == ["canceled", "failed", "passed"]
    assert ACTIVE_BUILD_STATES == {s for s in BuildState if not s.is_terminal}


def test_transitions_table_is_exactly_the_spec_table() -> None:
    actual = {(s.value, e.value): t.value for (s, e), t in TRANSITIONS.items()}
    assert set(actual) - set(EXPECTED) == set(), "pairs the SPEC does not allow"
    assert set(EXPECTED) - set(actual) == set(), "SPEC rows missing from the table"
    assert actual == EXPECTED


@pytest.mark.parametrize(("pair", "target"), sorted(EXPECTED.items()), ids=str)
def test_transition_follows_each_spec_row(pair: tuple[str, str], target: str) -> None:
    state, event = pair
    assert transition(JobState(state), Event(event)) is JobState(target)


def test_transition_rejects_every_pair_not_in_the_table() -> None:
    assert _NOT_IN_TABLE  # most pairs are bugs
    for state, event in _NOT_IN_TABLE:
        with pytest.raises(InvalidTransitionError):
            transition(state, event)


def test_transition_error_names_the_state_and_the_event() -> None:
    with pytest.raises(InvalidTransitionError) as info:
        transition(JobState.PASSED, Event.STARTED)
    message = str(info.value)
    assert "'passed'" in message
    assert "'started'" in message


def _rejected_event(state: JobState) -> Event:
    return next(e for e in Event if (state.value, e.value) not in EXPECTED)


@pytest.mark.parametrize("state", list(JobState), ids=str)
def test_transition_error_lists_the_events_the_state_allows(state: JobState) -> None:
    allowed = sorted(e for (s, e) in EXPECTED if s == state.value)
    with pytest.raises(InvalidTransitionError) as info:
        transition(state, _rejected_event(state))
    listed = ", ".join(allowed) or "none (terminal state)"
    assert f"allowed events: {listed}. " in str(info.value)


def test_transition_error_says_it_is_a_bug_to_report() -> None:
    with pytest.raises(InvalidTransitionError) as info:
        transition(JobState.PASSED, Event.STARTED)
    assert str(info.value).endswith(
        "This is a bug in harmont-exec: please report it with the build's history"
    )


def test_transition_table_builder_returns_exactly_the_spec_table() -> None:
    """``_table`` runs once at import, where no test can see a change to it; call it here."""
    built = {(s.value, e.value): t.value for (s, e), t in _table().items()}
    assert built == EXPECTED


@pytest.mark.parametrize("state", _TERMINAL)
def test_transition_terminal_states_leave_only_by_resume(state: str) -> None:
    """Within a run a terminal state is final; only `harmont-exec resume` of an abandoned
    build reopens a lost (failed) or never-started (canceled) job."""
    ways_out = [e for (s, e) in TRANSITIONS if s is JobState(state)]
    assert ways_out == ([Event.RESUMED] if state in ("failed", "canceled") else [])
    for event in Event:
        if event in ways_out:
            continue
        with pytest.raises(InvalidTransitionError):
            transition(JobState(state), event)


S = JobState
B = BuildState


@pytest.mark.parametrize(
    ("jobs", "cancel_requested", "expected"),
    [
        pytest.param(_jobs(S.PASSED, S.PASSED), False, B.PASSED, id="all-passed"),
        pytest.param(_jobs((S.FAILED, True)), False, B.PASSED, id="only-a-soft-failure"),
        pytest.param(
            _jobs(S.PASSED, (S.FAILED, True), S.PASSED), False, B.PASSED, id="soft-among-passed"
        ),
        pytest.param(_jobs(S.FAILED, S.RUNNING), False, B.FAILING, id="hard-failure-active"),
        pytest.param(_jobs(S.FAILED, S.PENDING), False, B.FAILING, id="hard-failure-pending"),
        pytest.param(_jobs(S.FAILED, S.PASSED), False, B.FAILED, id="hard-failure-all-terminal"),
        pytest.param(_jobs(S.FAILED, S.SKIPPED), False, B.FAILED, id="failure-and-its-skips"),
        pytest.param(_jobs(S.TIMED_OUT, S.PASSED), False, B.FAILED, id="timed-out-terminal"),
        pytest.param(_jobs(S.TIMED_OUT, S.RUNNING), False, B.FAILING, id="timed-out-active"),
        pytest.param(_jobs(S.PASSED, S.RUNNING), True, B.CANCELING, id="cancel-active"),
        pytest.param(_jobs(S.CANCELING, S.PENDING), True, B.CANCELING, id="cancel-stopping"),
        pytest.param(_jobs(S.PASSED, S.CANCELED), True, B.CANCELED, id="cancel-all-terminal"),
        pytest.param(_jobs(S.FAILED, S.CANCELED), True, B.CANCELED, id="cancel-after-failure"),
        pytest.param(_jobs(S.PENDING, S.SCHEDULED), False, B.SCHEDULED, id="nothing-started"),
        pytest.param(_jobs(S.RUNNING, S.PENDING), False, B.RUNNING, id="one-running"),
        pytest.param(_jobs(S.PASSED, S.PENDING), False, B.RUNNING, id="one-done-one-pending"),
        pytest.param(_jobs(S.FAILED, S.CANCELED), False, B.FAILED, id="fail-fast"),
        pytest.param(
            _jobs(S.PASSED, S.CANCELED), False, B.CANCELED, id="canceled-job-without-build-cancel"
        ),
        pytest.param(
            _jobs((S.FAILED, True), S.CANCELED), False, B.CANCELED, id="canceled-and-soft-failed"
        ),
    ],
)
def test_roll_up_derives_the_build_state(
    jobs: list[JobStatus], cancel_requested: bool, expected: BuildState
) -> None:
    assert roll_up(jobs, cancel_requested=cancel_requested) is expected


def test_roll_up_without_cancel_requested_is_not_a_cancel() -> None:
    assert roll_up(_jobs(S.PASSED, S.RUNNING)) is B.RUNNING
    assert roll_up(_jobs(S.PASSED, S.PASSED)) is B.PASSED
