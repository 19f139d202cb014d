"""Hypothesis strategies for property-testing DAGs and build specs with harmont-exec.

Import them in your own test suite::

    from hypothesis import given
    from executor import build_plan
    from executor.testing import build_specs, dags

    @given(build_specs(max_steps=30))
    def test_every_job_runs_after_its_prerequisites(spec):
        plan = build_plan(spec)
        seen = set()
        for key in plan.order:
            assert set(plan.prerequisites(key)) <= seen
            seen.add(key)

Everything generated is valid: DAGs are acyclic by construction (a node only depends on nodes
generated before it) and specs pass ``parse_build_spec`` and ``build_plan``. To test rejection
paths, mutate what these produce.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from executor.model import MAX_RETRY_LIMIT, BuildSpec, StepSpec, WaitSpec

__all__ = ["build_specs", "commands", "dags", "step_keys"]

_PRINTABLE = st.characters(min_codepoint=32, blacklist_categories=("Cs", "Cc"))


def step_keys(*, max_size: int = 24, unicode: bool = True) -> st.SearchStrategy[str]:
    """Valid step keys: 1 to ``max_size`` characters, no control characters."""
    alphabet = _PRINTABLE if unicode else st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_")
    return st.text(alphabet=alphabet, min_size=1, max_size=max_size)


def commands() -> st.SearchStrategy[str]:
    """Shell commands: mostly real ones with known outcomes, sometimes arbitrary text."""
    real = st.sampled_from(["true", "false", "exit 3", "echo ok", "printf 'a\\nb'", "sleep 0"])
    text = st.text(alphabet=st.one_of(_PRINTABLE, st.just("\n")), min_size=1, max_size=40)
    return st.one_of(real, text.filter(lambda s: bool(s.strip())))


@st.composite
def dags(
    draw: st.DrawFn,
    *,
    min_nodes: int = 1,
    max_nodes: int = 20,
    keys: st.SearchStrategy[str] | None = None,
    max_prerequisites: int = 4,
) -> dict[str, tuple[str, ...]]:
    """A DAG as ``{key: prerequisites}``, in a topological order (acyclic by construction)."""
    names = draw(
        st.lists(
            keys if keys is not None else step_keys(unicode=False),
            min_size=min_nodes,
            max_size=max_nodes,
            unique=True,
        )
    )
    dag: dict[str, tuple[str, ...]] = {}
    for n, name in enumerate(names):
        earlier = names[:n]
        prerequisites = (
            draw(st.lists(st.sampled_from(earlier), max_size=max_prerequisites, unique=True))
            if earlier
            else []
        )
        dag[name] = tuple(prerequisites)
    return dag


_env = st.dictionaries(
    st.text(alphabet=_PRINTABLE.filter(lambda c: c != "="), min_size=1, max_size=12),
    st.text(alphabet=_PRINTABLE, max_size=20),
    max_size=3,
)
_seconds = st.floats(min_value=0.001, max_value=3600, allow_nan=False, allow_infinity=False)
_codes = st.one_of(
    st.just("*"), st.lists(st.integers(1, 255), min_size=1, max_size=4, unique=True).map(tuple)
)


@st.composite
def _retry_policies(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "limit": draw(st.integers(0, MAX_RETRY_LIMIT)),
        "exit_codes": draw(_codes),
        "on_timeout": draw(st.booleans()),
        "backoff": {
            "initial_seconds": draw(st.floats(0, 10, allow_nan=False)),
            "factor": draw(st.floats(1, 4, allow_nan=False)),
            "max_seconds": draw(st.floats(0, 60, allow_nan=False)),
            "jitter": draw(st.booleans()),
        },
    }


@st.composite
def build_specs(
    draw: st.DrawFn,
    *,
    min_steps: int = 1,
    max_steps: int = 20,
    waits: bool = True,
    policies: bool = True,
    unicode: bool = True,
) -> BuildSpec:
    """Valid ``BuildSpec`` values: a random DAG of command steps with random fields, wait
    barriers between them (``waits``) and retry / soft-fail policies (``policies``)."""
    dag = draw(dags(min_nodes=min_steps, max_nodes=max_steps, keys=step_keys(unicode=unicode)))
    steps: list[StepSpec | WaitSpec] = []
    for n, (key, prerequisites) in enumerate(dag.items()):
        if waits and n and draw(st.integers(0, 9)) == 0:
            steps.append(WaitSpec(continue_on_failure=draw(st.booleans())))
        fields: dict[str, Any] = {"key": key, "command": draw(commands())}
        builds_in = draw(st.sampled_from([None, *prerequisites]))
        depends_on = [p for p in prerequisites if p != builds_in]
        if depends_on:
            fields["depends_on"] = depends_on
        if builds_in is not None:
            fields["builds_in"] = builds_in
        optional: dict[str, st.SearchStrategy[Any]] = {
            "label": st.text(alphabet=_PRINTABLE, max_size=30),
            "env": _env,
            "timeout_seconds": _seconds,
            "artifact_paths": st.lists(
                st.sampled_from(["out/*.txt", "reports/**/*.xml"]), max_size=2, unique=True
            ),
            "allow_dependency_failure": st.booleans(),
        }
        if policies:
            optional["retry_policy"] = _retry_policies()
            optional["soft_fail_policy"] = st.one_of(
                st.just(True), st.builds(dict, exit_codes=_codes)
            )
        for name, strategy in optional.items():
            if draw(st.booleans()):
                fields[name] = draw(strategy)
        steps.append(StepSpec.model_validate(fields))
    top: dict[str, Any] = {"steps": steps}
    if draw(st.booleans()):
        top["env"] = draw(_env)
    if draw(st.booleans()):
        top["concurrency"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        top["timeout_seconds"] = draw(_seconds)
    return BuildSpec.model_validate(top)
