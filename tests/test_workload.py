"""The benchmark workload generator makes the graphs it claims, and they plan."""

from __future__ import annotations

import graphlib

import pytest

import executor
from benchmarks.workload import generate, predecessors


@pytest.mark.parametrize("shape", ["wide", "chain", "layered", "diamond"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_workload_plans_with_graphlib_agreeing(shape: str, shuffle: bool) -> None:
    build = generate(shape, 300, shuffle=shuffle, seed=3)
    preds = predecessors(build)
    plan = executor.build_plan(executor.BuildSpec.model_validate(build))
    assert len(plan) == len(preds) == 300
    assert set(plan.order) == set(graphlib.TopologicalSorter(preds).static_order())
    for key, deps in preds.items():
        assert set(plan.prerequisites(key)) == set(deps)


def test_workload_shapes_have_their_depth() -> None:
    assert (
        len(executor.build_plan(executor.BuildSpec.model_validate(generate("wide", 50))).levels)
        == 1
    )
    chain = executor.build_plan(executor.BuildSpec.model_validate(generate("chain", 50)))
    assert len(chain.levels) == 50
