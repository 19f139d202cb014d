"""BuildSpec -> Plan: validate the dependencies, order the jobs, and decide readiness.

Pure: no I/O, no clocks. A ``Plan`` is immutable. Its hot data is kept as integer-indexed
tuples (plan order, predecessors, levels) so planning 100k steps stays close to
``graphlib.TopologicalSorter``; the same DAG as a ``networkx.DiGraph`` is ``Plan.graph``, built on
first use, and networkx finds the cycle to report when there is one.

Edges come from ``depends_on``, ``builds_in`` and ``wait`` barriers. A barrier makes every later
step depend on the steps between it and the previous barrier (earlier ones follow by
transitivity), so a barrier between groups of a and b steps adds a*b edges.

The order is deterministic: the lexicographically smallest topological order by file position,
so jobs that become ready together start in file order, whatever the hash seed.
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from executor.errors import BuildFileError, CycleError, Diagnostic, InternalError, Loc
from executor.model import BuildSpec, StepSpec, WaitSpec
from executor.states import JobState, JobStatus

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["Decision", "Edge", "EdgeKind", "Frontier", "Plan", "Readiness", "Settled", "build_plan"]

# Bit flags: why an edge exists. An edge can have several reasons.
_DEPENDS_ON = 1
_BUILDS_IN = 2
_WAIT = 4
_CONTINUE = 8  # the wait that made it has continue_on_failure


class EdgeKind(StrEnum):
    DEPENDS_ON = "depends_on"
    BUILDS_IN = "builds_in"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Edge:
    """``target`` runs after ``source``. ``tolerant``: a failure of ``source`` does not skip it."""

    source: str
    target: str
    kinds: tuple[EdgeKind, ...]
    continue_on_failure: bool
    tolerant: bool


class Readiness(StrEnum):
    WAITING = "waiting"
    READY = "ready"
    SKIP = "skip"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Decision:
    """What a not-yet-started job should do given its prerequisites' states."""

    readiness: Readiness
    cause: str | None = None  # root-cause step key for SKIP / CANCEL


@dataclass(frozen=True, slots=True)
class Settled:
    """A job the cursor decided without running it: skipped or canceled because of ``cause``."""

    key: str
    state: JobState
    cause: str


def _kinds(flags: int) -> tuple[EdgeKind, ...]:
    out = []
    if flags & _DEPENDS_ON:
        out.append(EdgeKind.DEPENDS_ON)
    if flags & _BUILDS_IN:
        out.append(EdgeKind.BUILDS_IN)
    if flags & _WAIT:
        out.append(EdgeKind.WAIT)
    return tuple(out)


def _tolerant(flags: int) -> bool:
    """Only a continue_on_failure barrier, and no explicit edge, lets failures through."""
    return flags == _WAIT | _CONTINUE


class Plan:
    """A validated, ordered DAG of command steps. Build one with ``build_plan``."""

    def __init__(
        self,
        spec: BuildSpec,
        source: Path | None,
        steps: tuple[StepSpec, ...],
        preds: tuple[tuple[int, ...], ...],
        flags: tuple[tuple[int, ...], ...],
        order: tuple[int, ...],
    ) -> None:
        self.spec = spec
        self.source = source
        self._steps = steps  # file order
        self._preds = preds  # file-order indices, per step
        self._flags = flags  # parallel to _preds
        self._order = order  # file-order indices in plan order
        self._index = {s.key: i for i, s in enumerate(steps)}

    # --- shape -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[StepSpec]:
        return (self._steps[i] for i in self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @cached_property
    def order(self) -> tuple[str, ...]:
        """Step keys in plan order: topological, ties broken by file order."""
        return tuple(self._steps[i].key for i in self._order)

    @cached_property
    def _position(self) -> tuple[int, ...]:
        pos = [0] * len(self._order)
        for p, i in enumerate(self._order):
            pos[i] = p
        return tuple(pos)

    def step(self, key: str) -> StepSpec:
        return self._steps[self._idx(key)]

    def environment(self, key: str) -> dict[str, str]:
        """Build env overlaid by the step's env (the runner adds its own and HARMONT_* on top)."""
        return {**self.spec.env, **self.step(key).env}

    def position(self, key: str) -> int:
        """The step's place in plan order (0-based)."""
        return self._position[self._idx(key)]

    def prerequisites(self, key: str) -> tuple[str, ...]:
        """Direct prerequisites of ``key`` (all edge kinds), in plan order."""
        preds = sorted(self._preds[self._idx(key)], key=self._position.__getitem__)
        return tuple(self._steps[i].key for i in preds)

    def dependents(self, key: str) -> tuple[str, ...]:
        """Steps that directly depend on ``key``, in plan order."""
        succs = sorted(
            (j for j, _ in self._succ_edges[self._idx(key)]), key=self._position.__getitem__
        )
        return tuple(self._steps[i].key for i in succs)

    @cached_property
    def _succ_edges(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per step: (dependent, edge flags) pairs."""
        succs: list[list[tuple[int, int]]] = [[] for _ in self._steps]
        for j, (preds, flags) in enumerate(zip(self._preds, self._flags, strict=True)):
            for i, f in zip(preds, flags, strict=True):
                succs[i].append((j, f))
        return tuple(tuple(s) for s in succs)

    @cached_property
    def _levels(self) -> tuple[int, ...]:
        level = [0] * len(self._steps)
        get = level.__getitem__
        all_preds = self._preds
        for j in self._order:
            preds = all_preds[j]
            if preds:
                level[j] = 1 + max(map(get, preds))
        return tuple(level)

    @cached_property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        """Generations: level 0 has no prerequisites; level n needs something from level n-1."""
        if not self._steps:
            return ()
        out: list[list[str]] = [[] for _ in range(max(self._levels) + 1)]
        for i in self._order:
            out[self._levels[i]].append(self._steps[i].key)
        return tuple(tuple(keys) for keys in out)

    def level(self, key: str) -> int:
        return self._levels[self._idx(key)]

    @cached_property
    def critical_path(self) -> tuple[str, ...]:
        """A longest chain of dependent steps (first in plan order among equals), first to last;
        empty for a plan with no steps."""
        levels = self._levels
        if not levels:
            return ()
        pos = self._position
        depth = max(levels)
        node = min((i for i in range(len(levels)) if levels[i] == depth), key=pos.__getitem__)
        chain = [node]
        while levels[node] > 0:
            node = min(
                (i for i in self._preds[node] if levels[i] == levels[node] - 1),
                key=pos.__getitem__,
            )
            chain.append(node)
        return tuple(self._steps[i].key for i in reversed(chain))

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, ordered by target then source in plan order."""
        out = []
        pos = self._position
        for j in self._order:
            target = self._steps[j]
            pairs = sorted(
                zip(self._preds[j], self._flags[j], strict=True), key=lambda p: pos[p[0]]
            )
            for i, flags in pairs:
                out.append(
                    Edge(
                        source=self._steps[i].key,
                        target=target.key,
                        kinds=_kinds(flags),
                        continue_on_failure=bool(flags & _CONTINUE),
                        tolerant=target.allow_dependency_failure or _tolerant(flags),
                    )
                )
        return tuple(out)

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The DAG as a networkx DiGraph (built on first use): node = step key, edge = ordering.

        Node attributes: ``step`` (StepSpec), ``position`` (plan order), ``level``. Edge
        attributes: ``kinds`` (tuple of EdgeKind), ``continue_on_failure``, ``tolerant``.
        """
        import networkx as nx  # lazy: a fifth of harmont-exec's start-up time

        graph = nx.DiGraph()
        graph.add_nodes_from(
            (s.key, {"step": s, "position": self._position[i], "level": self._levels[i]})
            for i, s in ((i, self._steps[i]) for i in self._order)
        )
        graph.add_edges_from(
            (
                e.source,
                e.target,
                {
                    "kinds": e.kinds,
                    "continue_on_failure": e.continue_on_failure,
                    "tolerant": e.tolerant,
                },
            )
            for e in self.edges
        )
        return graph

    # --- readiness ---------------------------------------------------------------------------

    def readiness(self, key: str, statuses: Mapping[str, JobStatus]) -> Decision:
        """Recompute what job ``key`` should do from its prerequisites' current statuses.

        ``statuses`` maps step keys to states (missing = pending). A hard failure, timeout or
        skip of a prerequisite skips the job unless the edge tolerates failures; a canceled
        prerequisite cancels it. The first such prerequisite in plan order decides, and the
        cause is the root failure (a skipped prerequisite's own cause).
        """
        j = self._idx(key)
        waiting = False
        pos = self._position
        edges = sorted(zip(self._preds[j], self._flags[j], strict=True), key=lambda e: pos[e[0]])
        for i, flags in edges:
            status = statuses.get(self._steps[i].key)
            if status is None or not status.state.is_terminal:
                waiting = True
                continue
            decision = self._edge_decision(i, j, flags, status)
            if decision is not None:
                return decision
        return Decision(Readiness.WAITING if waiting else Readiness.READY)

    def _edge_decision(self, i: int, j: int, flags: int, status: JobStatus) -> Decision | None:
        source = self._steps[i].key
        if status.state is JobState.CANCELED:
            return Decision(Readiness.CANCEL, status.cause or source)
        bad = status.is_hard_failure or status.state is JobState.SKIPPED
        if bad and not (self._steps[j].allow_dependency_failure or _tolerant(flags)):
            cause = status.cause if status.state is JobState.SKIPPED and status.cause else source
            return Decision(Readiness.SKIP, cause)
        return None

    def frontier(self) -> Frontier:
        """A fresh incremental walk of this plan (see ``Frontier``)."""
        return Frontier(self)

    def _idx(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no step with key {key!r} in this plan") from None


class Frontier:
    """graphlib-style protocol for a scheduler: ``ready()`` hands out startable jobs in plan
    order, ``done(key, state)`` records a terminal state and returns the jobs that it skipped or
    canceled in cascade (already recorded as terminal here).

    It applies ``Plan.readiness`` incrementally, edge by edge, so a build of n steps and e edges
    costs O(n log n + e) in total.
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        preds = plan._preds
        self._remaining = [len(p) for p in preds]
        self._statuses: dict[str, JobStatus] = {}
        self._handed_out: set[int] = set()
        pos = plan._position
        self._heap = [(pos[i], i) for i, p in enumerate(preds) if not p]
        heapq.heapify(self._heap)

    @property
    def statuses(self) -> Mapping[str, JobStatus]:
        """Terminal statuses recorded so far, by step key."""
        return self._statuses

    def is_active(self) -> bool:
        """True while some job is not terminal."""
        return len(self._statuses) < len(self._plan)

    def ready(self) -> tuple[str, ...]:
        """Jobs whose prerequisites are all satisfied, not returned before, in plan order."""
        out = []
        steps = self._plan._steps
        while self._heap:
            _, i = heapq.heappop(self._heap)
            if steps[i].key not in self._statuses:
                self._handed_out.add(i)
                out.append(steps[i].key)
        return tuple(out)

    def done(self, key: str, state: JobState, *, soft_failed: bool = False) -> tuple[Settled, ...]:
        """Record that ``key`` ended in terminal ``state``; return the jobs settled in cascade.

        A job may be done without having been handed out (a pending job canceled with its
        build). Reporting a job twice or a non-terminal state is a bug and raises.
        """
        plan = self._plan
        i = plan._idx(key)
        if not state.is_terminal:
            raise InternalError(f"done({key!r}, {state.value!r}): the state is not terminal")
        if key in self._statuses:
            raise InternalError(f"done({key!r}) called twice; it is already {self._statuses[key]}")
        self._statuses[key] = JobStatus(state, soft_failed=soft_failed)
        settled: list[Settled] = []
        work = [i]
        while work:
            i = work.pop()
            status = self._statuses[plan._steps[i].key]
            for j, flags in plan._succ_edges[i]:
                target = plan._steps[j].key
                if target in self._statuses:
                    continue
                if j in self._handed_out:
                    raise InternalError(
                        f"job {target!r} was started before its prerequisite "
                        f"{plan._steps[i].key!r} finished"
                    )
                decision = plan._edge_decision(i, j, flags, status)
                if decision is None:
                    self._remaining[j] -= 1
                    if self._remaining[j] == 0:
                        heapq.heappush(self._heap, (plan._position[j], j))
                    continue
                new_state = (
                    JobState.SKIPPED if decision.readiness is Readiness.SKIP else JobState.CANCELED
                )
                if decision.cause is None:
                    raise InternalError(
                        f"job {target!r} is {new_state.value} in cascade, but its decision "
                        f"names no cause ({decision!r})"
                    )
                self._statuses[target] = JobStatus(new_state, cause=decision.cause)
                settled.append(Settled(target, new_state, decision.cause))
                work.append(j)
        return tuple(settled)


# --- building a plan ---------------------------------------------------------------------------


def build_plan(spec: BuildSpec, *, source: Path | None = None) -> Plan:
    """Validate the relations between ``spec``'s steps and order them. Pure.

    Raises ``BuildFileError`` (every problem at once: duplicate keys, unknown or self
    dependencies) or ``CycleError``. Diagnostics carry ``loc`` paths into ``spec.steps``; the
    loader turns them into file positions.
    """
    positions: list[int] = []  # index in spec.steps of each command step
    steps: list[StepSpec] = []
    for pos, item in enumerate(spec.steps):
        if isinstance(item, StepSpec):
            positions.append(pos)
            steps.append(item)
    diagnostics: list[Diagnostic] = []
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        first = index.setdefault(step.key, i)
        if first != i:
            diagnostics.append(
                Diagnostic(
                    f"duplicate step key {step.key!r}: step #{positions[first] + 1} already uses "
                    "it; give each step a unique key",
                    loc=("steps", positions[i], "key"),
                    step_key=step.key,
                )
            )

    preds, flags = _collect_edges(spec, steps, positions, index, diagnostics)
    if diagnostics:
        raise BuildFileError(diagnostics)
    order = _order(preds)
    if len(order) < len(steps):
        raise _cycle_error(steps, positions, preds, flags, set(order))
    return Plan(spec, source, tuple(steps), preds, flags, order)


def _collect_edges(
    spec: BuildSpec,
    steps: list[StepSpec],
    positions: list[int],
    index: Mapping[str, int],
    diagnostics: list[Diagnostic],
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    preds: list[tuple[int, ...]] = []
    flags: list[tuple[int, ...]] = []
    group: list[int] = []  # command steps since the last barrier
    barrier: tuple[int, ...] = ()  # what the steps after the last barrier wait for
    barrier_flags = 0
    j = 0
    for item in spec.steps:
        if isinstance(item, WaitSpec):
            cont = _CONTINUE if item.continue_on_failure else 0
            if group:
                barrier, barrier_flags, group = tuple(group), _WAIT | cont, []
            else:  # consecutive barriers: strict unless all of them continue on failure
                barrier_flags &= _WAIT | cont
            continue
        step = steps[j]
        mine: dict[int, int] = dict.fromkeys(barrier, barrier_flags)
        for n, dep in enumerate(step.depends_on):
            i = _resolve(
                dep,
                j,
                ("steps", positions[j], "depends_on", n),
                "depends_on",
                steps,
                index,
                diagnostics,
            )
            if i is not None:
                mine[i] = mine.get(i, 0) | _DEPENDS_ON
        if step.builds_in is not None:
            i = _resolve(
                step.builds_in,
                j,
                ("steps", positions[j], "builds_in"),
                "builds_in",
                steps,
                index,
                diagnostics,
            )
            if i is not None:
                mine[i] = mine.get(i, 0) | _BUILDS_IN
        preds.append(tuple(mine))
        flags.append(tuple(mine.values()))
        group.append(j)
        j += 1
    return tuple(preds), tuple(flags)


def _resolve(
    dep: str,
    j: int,
    loc: Loc,
    field: str,
    steps: list[StepSpec],
    index: Mapping[str, int],
    diagnostics: list[Diagnostic],
) -> int | None:
    key = steps[j].key
    i = index.get(dep)
    if i == j or dep == key:
        diagnostics.append(
            Diagnostic(
                f"{field} names {dep!r}, its own key: the step depends on itself; remove it",
                loc=loc,
                step_key=key,
            )
        )
        return None
    if i is None:
        close = difflib.get_close_matches(dep, list(index), n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        diagnostics.append(
            Diagnostic(
                f"{field} names {dep!r}, which no step defines{guess}; define a step with key "
                f"{dep!r} or remove it",
                loc=loc,
                step_key=key,
            )
        )
    return i


def _order(preds: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Smallest topological order by file index (Kahn with a heap). Shorter if there is a cycle."""
    n = len(preds)
    if all(i < j for j, p in enumerate(preds) for i in p):
        return tuple(range(n))  # the file is already in dependency order: it is the answer
    remaining = [len(p) for p in preds]
    succs: list[list[int]] = [[] for _ in range(n)]
    for j, p in enumerate(preds):
        for i in p:
            succs[i].append(j)
    heap = [j for j in range(n) if not remaining[j]]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        out.append(i)
        for j in succs[i]:
            remaining[j] -= 1
            if not remaining[j]:
                heapq.heappush(heap, j)
    return tuple(out)


def _cycle_error(
    steps: list[StepSpec],
    positions: list[int],
    preds: tuple[tuple[int, ...], ...],
    flags: tuple[tuple[int, ...], ...],
    ordered: set[int],
) -> CycleError:
    import networkx as nx  # lazy, as in Plan.graph

    # Edges point from a step to what it depends on, so the cycle reads "a depends on b".
    graph = nx.DiGraph()
    stuck = [j for j in range(len(steps)) if j not in ordered]
    graph.add_nodes_from(stuck)
    graph.add_edges_from((j, i) for j in stuck for i in preds[j] if i not in ordered)
    cycle_edges = nx.find_cycle(graph)
    nodes = [u for u, _ in cycle_edges]
    start = nodes.index(min(nodes))
    nodes = nodes[start:] + nodes[:start]
    keys = [steps[i].key for i in nodes]
    # Point at the first explicit edge of the cycle (a barrier edge has no line of its own).
    loc: Loc = ("steps", positions[nodes[0]])
    step_key = keys[0]
    for a, b in zip(nodes, [*nodes[1:], nodes[0]], strict=True):
        edge = flags[a][preds[a].index(b)]
        if edge & _DEPENDS_ON:
            loc = ("steps", positions[a], "depends_on", steps[a].depends_on.index(steps[b].key))
        elif edge & _BUILDS_IN:
            loc = ("steps", positions[a], "builds_in")
        else:
            continue
        step_key = steps[a].key
        break
    path = " -> ".join([*keys, keys[0]])
    return CycleError(
        [*keys, keys[0]],
        Diagnostic(
            f"dependency cycle: {path} (each step depends on the next); remove one of these "
            "dependencies",
            loc=loc,
            step_key=step_key,
        ),
    )
