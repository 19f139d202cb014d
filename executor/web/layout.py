"""The build page's DAG, laid out from the plan: where each job, each wait barrier and each
edge is drawn (SPEC §9). Pure: no I/O, no HTML; ``templates/dag.svg.j2`` draws the result.

The layout is a small Sugiyama pass, the way graphviz's ``dot`` and dagre lay out a DAG:

1. **Barriers.** A ``wait`` step makes every job after it depend on every job before it; drawn
   as it is, that is m x n edges. Each distinct set of jobs a wait holds back becomes one
   barrier node instead: m edges in, n edges out, and the barrier shows where the wait is.
2. **Layers.** Each node goes one layer after its latest prerequisite (longest path from the
   sources), so edges all point the same way.
3. **Dummies.** An edge that spans several layers passes through one dummy point per layer,
   so the ordering pass sees it and it bends around the nodes it would cross.
4. **Order.** Within each layer, nodes start in plan order; sweeps down and up the layers then
   sort each layer by the barycentre (mean position) of its neighbours in the layer just
   placed, keeping the order with the fewest crossings (counted exactly, as inversions).
5. **Coordinates.** A layer is a column (``LR``) or a row (``TB``); nodes are spaced evenly
   and each layer is centred on the widest.

Past ``collapse_over`` jobs, one node per plan level stands for all the jobs of that level (it
counts them by state on the page), with an edge between two levels where any job of one
depends on a job of the other: a 10,000-job build stays a picture, not a hairball.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import pairwise

from executor.plan import EdgeKind, Plan

__all__ = [
    "COLLAPSE_OVER",
    "Direction",
    "Layout",
    "LayoutLink",
    "LayoutNode",
    "NodeKind",
    "count_crossings",
    "layout_plan",
    "svg_path",
]

COLLAPSE_OVER = 300
"""Past this many jobs the DAG is drawn one node per level."""
WORK_LIMIT = 4000
"""Past this many nodes, edges and bends (see ``_work``) too: a few hundred jobs that each
depend on dozens would cost the ordering pass minutes and the page megabytes."""
ARC = 18.0  # how far an edge that skips levels arcs beside the line, per level skipped
_SWEEPS = 12  # down-and-up pairs; the best order seen is kept

NODE_W, NODE_H = 176.0, 36.0
"""A job node's box; a barrier is a thin bar across the gap."""
BARRIER_W = 6.0
GAP_LAYER, GAP_NODE = 64.0, 14.0
MARGIN = 16.0


class Direction(StrEnum):
    LR = "LR"  # layers are columns, edges point right
    TB = "TB"  # layers are rows, edges point down


class NodeKind(StrEnum):
    JOB = "job"
    BARRIER = "barrier"  # a wait step
    LEVEL = "level"  # a collapsed plan level: many jobs
    DUMMY = "dummy"  # where a long edge crosses a layer (never drawn)


@dataclass(frozen=True, slots=True)
class LayoutNode:
    """One drawn node: ``id`` is the step key (JOB), ``wait:<n>`` (BARRIER) or
    ``level:<n>`` (LEVEL); ``members`` are the step keys it stands for."""

    id: str
    kind: NodeKind
    layer: int
    x: float
    y: float
    width: float
    height: float
    members: tuple[str, ...]
    continue_on_failure: bool = False


@dataclass(frozen=True, slots=True)
class LayoutLink:
    """One drawn edge, from ``source`` to ``target`` (node ids), through ``points`` (its
    start, a point per layer it crosses, its end). ``tolerant``: a failure of the source does
    not skip the target (drawn dashed)."""

    source: str
    target: str
    points: tuple[tuple[float, float], ...]
    tolerant: bool = False


@dataclass(frozen=True, slots=True)
class Layout:
    nodes: tuple[LayoutNode, ...]
    links: tuple[LayoutLink, ...]
    width: float
    height: float
    direction: Direction
    collapsed: bool
    crossings: int
    node_of: Mapping[str, str] = field(default_factory=dict)
    """step key -> the id of the node that draws it (itself, or its level when collapsed)."""
    hidden_links: int = 0
    """Edges between levels that are not neighbours, left out of a very dense collapsed graph."""


@dataclass(slots=True)
class _Graph:
    """The graph being laid out: nodes in their initial order, edges by source."""

    kind: dict[str, NodeKind] = field(default_factory=dict)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    continues: dict[str, bool] = field(default_factory=dict)
    succ: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    tolerant: set[tuple[str, str]] = field(default_factory=set)

    def add(self, node: str, kind: NodeKind, members: tuple[str, ...] = ()) -> None:
        self.kind[node] = kind
        self.members[node] = members

    def link(self, source: str, target: str, *, tolerant: bool = False) -> None:
        if target not in self.succ[source]:
            self.succ[source].append(target)
        if tolerant:
            self.tolerant.add((source, target))


def layout_plan(
    plan: Plan,
    *,
    direction: Direction = Direction.LR,
    collapse_over: int = COLLAPSE_OVER,
    work_limit: int = WORK_LIMIT,
) -> Layout:
    """The DAG of ``plan`` laid out (see the module docstring). Its cost is bounded: a plan of
    more than ``collapse_over`` jobs, or whose drawing would have more than ``work_limit``
    nodes, edges and bends (a few hundred jobs that each depend on dozens), is drawn one node
    per level."""
    if len(plan) <= collapse_over:
        graph = _jobs_graph(plan)
        layer = _layers(graph)
        if _work(graph, layer) <= work_limit:
            rows, owners = _with_dummies(graph, layer)
            rows = _order(rows, graph)
            return _place(graph, rows, owners, direction, False, plan)
    return _levels(plan, direction, work_limit)


def _work(graph: _Graph, layer: Mapping[str, int]) -> int:
    """What drawing ``graph`` in full would cost: its nodes, edges and the bends of its long
    edges (the ordering pass's work grows with these)."""
    bends = sum(
        max(layer[t] - layer[s] - 1, 0) + 1 for s, targets in graph.succ.items() for t in targets
    )
    return len(graph.kind) + bends


def _levels(plan: Plan, direction: Direction, work_limit: int) -> Layout:
    """One node per plan level, in a line: levels are layers already (a job's level is one
    more than its deepest prerequisite's), so there is nothing to order and no bend to route;
    an edge that skips levels arcs beside the line. Past ``work_limit`` edges only those
    between neighbouring levels are drawn (``hidden_links`` counts the others)."""
    graph = _levels_graph(plan)
    rows = [[node] for node in graph.kind]
    pairs = [(s, t) for s, targets in graph.succ.items() for t in targets]
    hidden = 0
    if len(pairs) > work_limit:
        near = [(s, t) for s, t in pairs if int(t[6:]) - int(s[6:]) == 1]
        hidden, pairs = len(pairs) - len(near), near
    graph.succ = defaultdict(list)
    for s, t in pairs:
        graph.succ[s].append(t)
    layout = _place(graph, rows, {}, direction, True, plan)
    return replace(layout, hidden_links=hidden)


def _jobs_graph(plan: Plan) -> _Graph:
    graph = _Graph()
    for key in plan.order:
        graph.add(key, NodeKind.JOB, (key,))
    barriers: dict[tuple[frozenset[str], bool], str] = {}
    waits: dict[str, list[str]] = defaultdict(list)  # target -> its wait sources
    continues: dict[str, bool] = {}
    for edge in plan.edges:
        if EdgeKind.WAIT in edge.kinds:
            waits[edge.target].append(edge.source)
            continues[edge.target] = edge.continue_on_failure
        else:
            graph.link(edge.source, edge.target, tolerant=edge.tolerant)
    for target in plan.order:
        if target not in waits:
            continue
        sources = frozenset(waits[target])
        cont = continues[target]
        barrier = barriers.get((sources, cont))
        if barrier is None:
            barrier = f"wait:{len(barriers) + 1}"
            barriers[sources, cont] = barrier
            graph.add(barrier, NodeKind.BARRIER)
            graph.continues[barrier] = cont
            for source in sorted(sources, key=plan.position):
                graph.link(source, barrier, tolerant=cont)
        graph.link(barrier, target, tolerant=cont)
    return graph


def _levels_graph(plan: Plan) -> _Graph:
    graph = _Graph()
    levels = plan.levels
    level_of = {key: n for n, keys in enumerate(levels) for key in keys}
    for n, keys in enumerate(levels):
        graph.add(f"level:{n}", NodeKind.LEVEL, tuple(keys))
    for edge in plan.edges:
        graph.link(f"level:{level_of[edge.source]}", f"level:{level_of[edge.target]}")
    return graph


def _layers(graph: _Graph) -> dict[str, int]:
    """Longest path from the sources; the nodes are in a topological order already (plan
    order, with each barrier after its sources and before its first target)."""
    order = _topological(graph)
    layer = dict.fromkeys(order, 0)
    for node in order:
        for target in graph.succ.get(node, ()):
            layer[target] = max(layer[target], layer[node] + 1)
    return layer


def _topological(graph: _Graph) -> list[str]:
    indegree = dict.fromkeys(graph.kind, 0)
    for targets in graph.succ.values():
        for target in targets:
            indegree[target] += 1
    ready = [n for n in graph.kind if indegree[n] == 0]
    order: list[str] = []
    position = {n: i for i, n in enumerate(graph.kind)}
    ready.sort(key=position.__getitem__, reverse=True)
    while ready:
        node = ready.pop()
        order.append(node)
        for target in graph.succ.get(node, ()):
            indegree[target] -= 1
            if indegree[target] == 0:
                insort(ready, target, key=lambda n: -position[n])
    return order


def _with_dummies(
    graph: _Graph, layer: Mapping[str, int]
) -> tuple[list[list[str]], dict[str, tuple[str, str]]]:
    """The layers' nodes (initial order: as the graph lists them), with a dummy per layer a
    long edge crosses; ``owners`` maps each dummy to its edge. The graph's ``succ`` is
    rewritten to go through the dummies."""
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for node in graph.kind:
        rows[layer[node]].append(node)
    owners: dict[str, tuple[str, str]] = {}
    succ: dict[str, list[str]] = defaultdict(list)
    for source, targets in list(graph.succ.items()):
        for target in targets:
            previous = source
            for n in range(layer[source] + 1, layer[target]):
                dummy = f"~{len(owners)}"
                owners[dummy] = (source, target)
                graph.kind[dummy] = NodeKind.DUMMY
                graph.members[dummy] = ()
                rows[n].append(dummy)
                succ[previous].append(dummy)
                previous = dummy
            succ[previous].append(target)
    graph.succ = succ
    return rows, owners


def _order(rows: list[list[str]], graph: _Graph) -> list[list[str]]:
    """Barycentre sweeps; the order with the fewest crossings wins (ties: the earlier)."""
    pred: dict[str, list[str]] = defaultdict(list)
    for source, targets in graph.succ.items():
        for target in targets:
            pred[target].append(source)
    best = [list(r) for r in rows]
    best_crossings = _crossings(best, graph.succ)
    current = [list(r) for r in rows]
    for _ in range(_SWEEPS):
        for n in range(1, len(current)):
            current[n] = _sorted_by_barycentre(current[n], current[n - 1], pred)
        for n in range(len(current) - 2, -1, -1):
            current[n] = _sorted_by_barycentre(current[n], current[n + 1], graph.succ)
        crossings = _crossings(current, graph.succ)
        if crossings < best_crossings:
            best, best_crossings = [list(r) for r in current], crossings
        if best_crossings == 0:
            break
    return best


def _sorted_by_barycentre(
    row: list[str], fixed: Sequence[str], neighbours: Mapping[str, Sequence[str]]
) -> list[str]:
    where = {node: i for i, node in enumerate(fixed)}

    def centre(item: tuple[int, str]) -> tuple[float, int]:
        i, node = item
        around = [where[n] for n in neighbours.get(node, ()) if n in where]
        # A node with no neighbour there keeps its place.
        return (sum(around) / len(around) if around else float(i), i)

    return [node for _, node in sorted(enumerate(row), key=centre)]


def _crossings(rows: Sequence[Sequence[str]], succ: Mapping[str, Sequence[str]]) -> int:
    total = 0
    for upper, lower in pairwise(rows):
        where = {node: i for i, node in enumerate(lower)}
        pairs = [
            (i, where[t]) for i, node in enumerate(upper) for t in succ.get(node, ()) if t in where
        ]
        total += count_crossings(pairs)
    return total


def count_crossings(pairs: Iterable[tuple[int, int]]) -> int:
    """How many pairs of edges between two layers cross, each edge given as (its position in
    the upper layer, its position in the lower): the inversions of the lower positions once
    sorted by the upper (edges that share an end do not cross)."""
    seen: list[int] = []
    total = 0
    for _, lower in sorted(pairs):
        total += len(seen) - bisect_left(seen, lower + 1)
        insort(seen, lower)
    return total


def _place(
    graph: _Graph,
    rows: list[list[str]],
    owners: Mapping[str, tuple[str, str]],
    direction: Direction,
    collapsed: bool,
    plan: Plan,
) -> Layout:
    def size(node: str) -> tuple[float, float]:
        kind = graph.kind[node]
        if kind is NodeKind.BARRIER:
            return (BARRIER_W, NODE_H) if direction is Direction.LR else (NODE_H, BARRIER_W)
        if kind is NodeKind.DUMMY:
            return (0.0, 0.0)
        return (NODE_W, NODE_H)

    # Along a layer: nodes are spaced by the job box's extent across the layer.
    across = NODE_H if direction is Direction.LR else NODE_W
    pitch = across + GAP_NODE
    widest = max((len(r) for r in rows), default=0)
    span = widest * pitch - GAP_NODE if widest else 0.0
    centre: dict[str, tuple[float, float]] = {}
    layer_of: dict[str, int] = {}
    lr = direction is Direction.LR

    def depth(row: Sequence[str]) -> float:  # a layer's extent along the edges
        return max((size(n)[0 if lr else 1] for n in row), default=0.0)

    start = MARGIN
    for n, row in enumerate(rows):
        along = start + depth(row) / 2
        start += depth(row) + GAP_LAYER
        offset = MARGIN + (span - (len(row) * pitch - GAP_NODE)) / 2
        for i, node in enumerate(row):
            side = offset + i * pitch + across / 2
            centre[node] = (along, side) if lr else (side, along)
            layer_of[node] = n
    nodes = []
    for row in rows:
        for node in row:
            kind = graph.kind[node]
            if kind is NodeKind.DUMMY:
                continue
            w, h = size(node)
            cx, cy = centre[node]
            nodes.append(
                LayoutNode(
                    node,
                    kind,
                    layer_of[node],
                    cx - w / 2,
                    cy - h / 2,
                    w,
                    h,
                    graph.members[node],
                    graph.continues.get(node, False),
                )
            )

    def port(node: str, out: bool) -> tuple[float, float]:
        cx, cy = centre[node]
        w, h = size(node)
        sign = 1 if out else -1
        if lr:
            return (cx + sign * w / 2, cy)
        return (cx, cy + sign * h / 2)

    links = []
    deepest = 0.0  # how far the arcs of a collapsed graph reach beside its line
    for source in [n for row in rows for n in row if graph.kind[n] is not NodeKind.DUMMY]:
        for first in graph.succ.get(source, ()):
            points = [port(source, True)]
            node = first
            while graph.kind[node] is NodeKind.DUMMY:
                points.append(centre[node])
                node = graph.succ[node][0]
            skipped = layer_of[node] - layer_of[source] - 1
            if collapsed and skipped > 0:  # one line of levels: arc beside it, not through
                depth_of_arc = min(ARC * (skipped + 1), 12 * ARC)
                deepest = max(deepest, depth_of_arc)
                (sx, sy), (tx, ty) = centre[source], centre[node]
                mid = (
                    ((sx + tx) / 2, sy + across / 2 + depth_of_arc)
                    if lr
                    else (
                        sx + across / 2 + depth_of_arc,
                        (sy + ty) / 2,
                    )
                )
                points.append(mid)
            points.append(port(node, False))
            links.append(
                LayoutLink(source, node, tuple(points), tolerant=(source, node) in graph.tolerant)
            )
    extent = start - GAP_LAYER + MARGIN if rows else MARGIN * 2
    breadth = MARGIN * 2 + span + deepest
    width, height = (extent, breadth) if direction is Direction.LR else (breadth, extent)
    node_of = {key: key for key in plan.order}
    if collapsed:
        node_of = {k: n.id for n in nodes for k in n.members}
    return Layout(
        tuple(nodes),
        tuple(links),
        width,
        height,
        direction,
        collapsed,
        _crossings(rows, graph.succ),
        node_of,
    )


def svg_path(link: LayoutLink, direction: Direction = Direction.LR) -> str:
    """The SVG path of ``link``: a smooth curve through its points, leaving and entering each
    along the direction of the layers (so it reads as flowing from node to node)."""
    (x, y), *rest = link.points
    parts = [f"M{x:.1f},{y:.1f}"]
    for nx, ny in rest:
        if direction is Direction.LR:
            mid = (x + nx) / 2
            parts.append(f"C{mid:.1f},{y:.1f} {mid:.1f},{ny:.1f} {nx:.1f},{ny:.1f}")
        else:
            mid = (y + ny) / 2
            parts.append(f"C{x:.1f},{mid:.1f} {nx:.1f},{mid:.1f} {nx:.1f},{ny:.1f}")
        x, y = nx, ny
    return " ".join(parts)
