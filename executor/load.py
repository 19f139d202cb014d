"""Build file -> BuildSpec (and Plan): YAML or JSON, our format and Harmont's two v0 IR forms.

Owns everything that knows about the file: reading it, syntax errors, duplicate mapping keys,
turning Harmont's graph form into our step list, dropping cloud-only fields (with one warning),
and mapping every diagnostic's ``loc`` back to ``file:line:column``. ``_Source`` carries one
file through it (read, parse, normalize, validate); the graph form's own checks (its fields,
node holes, nodes, edges) and the map from its step list back into the graph are the small
functions after it. It must not decide what a field means (``executor.model``) or how steps
relate (``executor.plan``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import yaml

from executor.errors import BuildFileError, Diagnostic, Loc
from executor.model import BuildSpec, describe_type, parse_build_spec, show_value
from executor.plan import Plan, build_plan

__all__ = ["CLOUD_FIELDS", "load_build", "load_plan", "parse_build_text", "plan_build_text"]

log = structlog.get_logger("executor.load")

CLOUD_FIELDS = frozenset({"image", "default_image", "cache", "runner", "runner_args", "secrets"})
"""Fields that only mean something in Harmont's cloud: accepted, ignored, warned about once."""

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BUILD_FIELDS = ("version", "env", "timeout_seconds", "concurrency")


def load_build(path: str | Path) -> BuildSpec:
    """Read and validate a build file field by field (``load_plan`` also checks dependencies)."""
    return _Source.read(Path(path)).spec()


def load_plan(path: str | Path) -> Plan:
    """Read a build file, validate it completely and plan it. Raises ``BuildFileError``."""
    return _Source.read(Path(path)).plan()


def parse_build_text(text: str, *, name: str = "<string>", json_format: bool = False) -> BuildSpec:
    """Like ``load_build`` for text in memory; ``name`` is used in messages."""
    return _Source.parse(text, name, json_format=json_format).spec()


def plan_build_text(text: str, *, name: str = "<string>", json_format: bool = False) -> Plan:
    """Like ``load_plan`` for text in memory; ``name`` is used in messages."""
    return _Source.parse(text, name, json_format=json_format).plan()


# --- source positions --------------------------------------------------------------------------


class _Locator:
    """Finds ``(line, column)`` (1-based) of a path in the document, from a composed YAML tree."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def find(self, loc: Loc, *, at_key: bool = False) -> tuple[int, int] | None:
        node = self._root
        if node is None:
            return None
        mark = node.start_mark
        for n, part in enumerate(loc):
            last = n == len(loc) - 1
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                pair = next((p for p in reversed(node.value) if p[0].value == part), None)
                if pair is None:
                    break
                node = pair[0] if at_key and last else pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    break
                node = node.value[part]
            else:
                break
            mark = node.start_mark
        return mark.line + 1, mark.column + 1


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        return None


def _duplicate_key(root: yaml.Node | None) -> tuple[str, yaml.Mark, yaml.Mark] | None:
    """The first mapping key that appears twice in one mapping: (key, first, second)."""
    stack = [root] if root is not None else []
    seen: set[int] = set()  # aliases share nodes: visit each once
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            marks: dict[object, yaml.Mark] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                if name in marks and name != "<<":
                    return str(name), marks[name], key.start_mark
                marks[name] = key.start_mark
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


_KEY_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"})
_TAG_WORDS = {
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
}


def _non_string_keys(root: yaml.Node | None) -> list[tuple[str, yaml.Mark]]:
    """The mapping keys that are not text (YAML reads ``1:``, ``true:``, ``on:`` or ``~:`` as
    values, and ``? [a]`` as a list), in file order: (message, where). Every key of a build
    file is a name, so such a key is a mistake, wherever it is."""
    found: list[tuple[str, yaml.Mark]] = []
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag in _KEY_TAGS:
                    stack.append(value)
                    continue
                if isinstance(key, yaml.ScalarNode):
                    text = key.value
                    what = _TAG_WORDS.get(key.tag, f"a value of type {key.tag.rsplit(':', 1)[-1]}")
                    message = (
                        f"mapping key {text!r} is read as {what}, not a name (YAML reads unquoted "
                        "numbers, true/false, yes/no, on/off and null as values); quote it: "
                        f'"{text}"'
                    )
                else:
                    message = (
                        "a mapping key here is a list or a mapping; keys are names: write a "
                        "quoted string"
                    )
                found.append((message, key.start_mark))
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    found.sort(key=lambda item: (item[1].line, item[1].column))
    return found


# --- the source --------------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    data: object
    locator: Callable[[], _Locator]
    path: Path | None = None
    to_source: Callable[[Loc], Loc] = field(default=lambda loc: loc)
    ignored: set[str] = field(default_factory=set)
    graph_form: bool = False  # Harmont's graph form: messages name graph.nodes, not steps
    # Problems found while reshaping (graph edges, a step's eval), at source locations;
    # reported together with the fields' own.
    problems: list[Diagnostic] = field(default_factory=list)
    from_eval: set[int] = field(default_factory=set)  # steps whose cmd came from eval
    bad_steps: set[int] = field(default_factory=set)  # graph nodes that are no step at all
    bad_evals: set[int] = field(default_factory=set)  # steps whose eval was refused

    @classmethod
    def read(cls, path: Path) -> _Source:
        name = str(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise _error(name, "no such file; check the path") from None
        except IsADirectoryError:
            raise _error(name, "is a directory; pass the build file inside it") from None
        except OSError as exc:
            raise _error(
                name, f"cannot read the file: {exc.strerror}; check its permissions"
            ) from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _error(
                name,
                f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                "save it as UTF-8",
            ) from None
        source = cls.parse(text, name, json_format=path.suffix.lower() == ".json")
        source.path = path
        return source

    @classmethod
    def parse(cls, text: str, name: str, *, json_format: bool) -> _Source:
        if not text.strip():
            raise _error(name, "the build file is empty; add a `steps:` list of steps")
        if json_format or name.lower().endswith(".json"):
            return cls._parse_json(text, name)
        if text.lstrip().startswith("{"):
            try:
                return cls._parse_json(text, name)
            except BuildFileError as not_json:
                if _compose(text) is None:  # not YAML either: the JSON error says more
                    raise not_json from None
                # A YAML flow mapping (`{steps: [...]}`): valid, or wrong in YAML's terms.
        return cls._parse_yaml(text, name)

    @classmethod
    def _parse_json(cls, text: str, name: str) -> _Source:
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            out = dict(items)
            if len(out) < len(items) and not duplicates:
                seen: set[str] = set()
                for key, _ in items:
                    if key in seen:
                        duplicates.append(key)
                        break
                    seen.add(key)
            return out

        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as exc:
            raise BuildFileError(
                [
                    Diagnostic(
                        f"invalid JSON: {exc.msg}; fix the syntax here (files ending in "
                        ".json or starting with '{' are read as JSON)",
                        file=name,
                        line=exc.lineno,
                        column=exc.colno,
                    )
                ]
            ) from None
        except RecursionError:
            raise _error(
                name, "the JSON is nested too deeply; a build file needs a few levels"
            ) from None
        cached: list[_Locator] = []

        def locator() -> _Locator:
            if not cached:
                cached.append(_Locator(_compose(text)))
            return cached[0]

        if duplicates:
            dup = _duplicate_key(_compose(text))
            line, column = (dup[2].line + 1, dup[2].column + 1) if dup else (None, None)
            raise BuildFileError(
                [
                    Diagnostic(
                        f"duplicate key {duplicates[0]!r} in one JSON object; keep only one",
                        file=name,
                        line=line,
                        column=column,
                    )
                ]
            )
        return cls(name, data, locator)

    @classmethod
    def _parse_yaml(cls, text: str, name: str) -> _Source:
        try:
            root = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(p for p in (exc.context, exc.problem) if p)
            raise _at_mark(name, f"invalid YAML: {problem}; fix the syntax here", mark) from None
        except yaml.YAMLError as exc:
            raise _error(name, f"invalid YAML: {exc}; fix the syntax") from None
        except RecursionError:
            raise _error(
                name, "the YAML is nested too deeply; a build file needs a few levels"
            ) from None
        if root is None:
            raise _error(
                name, "the build file is empty; add a `steps:` list with at least one step"
            )
        odd = _non_string_keys(root)
        if odd:
            raise BuildFileError(
                [
                    Diagnostic(message, file=name, line=mark.line + 1, column=mark.column + 1)
                    for message, mark in odd
                ]
            )
        dup = _duplicate_key(root)
        if dup is not None:
            key, first, second = dup
            raise _at_mark(
                name,
                f"duplicate key {key!r} (first at line {first.line + 1}); keep only one",
                second,
            )
        try:
            data = _Loader("").construct_document(root)
        except yaml.MarkedYAMLError as exc:
            raise _at_mark(
                name, f"invalid YAML value: {exc.problem}; fix it here", exc.problem_mark
            ) from None
        locator = _Locator(root)
        return cls(name, data, lambda: locator)

    # --- meaning -----------------------------------------------------------------------------

    def spec(self) -> BuildSpec:
        data = self._normalized()
        try:
            spec = parse_build_spec(data)
        except BuildFileError as exc:
            # A graph node that is no step at all has its own problem: not the fields it lacks.
            own = [d for d in exc.diagnostics if not self._in_bad_step(d)]
            raise self._located(exc.with_diagnostics([*self.problems, *own])) from None
        if self.problems:  # the graph's edges or a step's eval: reported with the fields'
            raise self._located(BuildFileError(self.problems))
        if self.ignored:
            log.warning(
                "cloud_fields_ignored",
                file=self.name,
                fields=sorted(self.ignored),
                reason="these fields only mean something in Harmont's cloud",
            )
        return spec

    def plan(self) -> Plan:
        spec = self.spec()
        try:
            return build_plan(spec, source=self.path)
        except BuildFileError as exc:
            raise self._located(exc) from None

    def _in_bad_step(self, diagnostic: Diagnostic) -> bool:
        loc = diagnostic.loc
        if len(loc) < 2 or loc[0] != "steps":
            return False
        if loc[1] in self.bad_steps:
            return True
        # a bad eval is that step's command problem: not also "has no command"
        return loc[1] in self.bad_evals and diagnostic.message.startswith("has no command")

    def _located(self, exc: BuildFileError) -> BuildFileError:
        locator = self.locator()
        out = []
        for d in exc.diagnostics:
            pos = locator.find(self.to_source(d.loc), at_key=d.message.startswith("unknown field"))
            if self.graph_form:
                d = replace(d, message=_graph_words(d.message))
            out.append(d.located(self.name, *(pos or (None, None))))
        out.sort(key=lambda d: (d.line or 0, d.column or 0))
        return exc.with_diagnostics(out)

    def _normalized(self) -> object:
        """Our format as plain data: Harmont graph form converted, cloud-only fields dropped."""
        data = self.data
        if not isinstance(data, Mapping):
            return data
        data = self._strip(data)
        if "graph" in data and "steps" not in data:
            data = self._from_graph(data)
        steps = data.get("steps")
        if isinstance(steps, list):
            data["steps"] = [self._step(n, s) for n, s in enumerate(steps)]
        graph_to_source = self.to_source

        def to_source(loc: Loc) -> Loc:
            # A cmd that came from eval is at eval.cmd in the file.
            if len(loc) >= 3 and loc[:1] == ("steps",) and loc[2] == "cmd":
                if loc[1] in self.from_eval:
                    loc = (*loc[:2], "eval", *loc[2:])
            return graph_to_source(loc)

        self.to_source = to_source
        return data

    def _step(self, n: int, step: object) -> object:
        """A step with cloud-only fields dropped, and a newer IR's ``eval: {type: cmd, cmd}``
        turned into its ``cmd`` (a wait has no eval: its fields say so)."""
        if not isinstance(step, Mapping):
            return step
        out = self._strip(step)
        if "eval" not in out or out.get("type", "command") != "command":
            return out
        how = out.pop("eval")
        key = out.get("key") if isinstance(out.get("key"), str) else None
        loc: Loc = ("steps", n, "eval")
        kind = how.get("type") if isinstance(how, Mapping) else None
        if kind == "cmd" and isinstance(how, Mapping) and set(how) <= {"type", "cmd"}:
            if "cmd" in out or "command" in out:
                self.problems.append(
                    Diagnostic(
                        "has both eval and cmd (or command); give the command once", loc, key
                    )
                )
            elif "cmd" in how:
                out["cmd"] = how["cmd"]
                self.from_eval.add(n)
        elif kind == "dynamic":
            self.bad_evals.add(n)
            self.problems.append(
                Diagnostic(
                    "is a dynamic step (eval type 'dynamic'), whose steps are only known while "
                    "the build runs in Harmont's cloud; harmont-exec runs steps whose commands "
                    "are in the IR: give this step eval {type: cmd, cmd: ...} or a cmd",
                    loc,
                    key,
                )
            )
        elif isinstance(how, Mapping) and kind != "cmd":
            self.bad_evals.add(n)
            self.problems.append(
                Diagnostic(
                    f"eval type is {show_value(kind)}; harmont-exec knows eval "
                    "{type: cmd, cmd: <shell command>} (or give the command as cmd)",
                    loc,
                    key,
                )
            )
        else:
            self.bad_evals.add(n)
            extra = sorted(set(how) - {"type", "cmd"}, key=str) if isinstance(how, Mapping) else []
            what = (
                f"has the unknown field {', '.join(map(show_value, extra))}"
                if extra
                else f"is {describe_type(how)} {show_value(how)}"
            )
            self.problems.append(
                Diagnostic(
                    f"eval {what}; use {{type: cmd, cmd: <shell command>}} (or give the command "
                    "as cmd)",
                    loc,
                    key,
                )
            )
        return out

    def _strip(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(mapping)
        for name in CLOUD_FIELDS.intersection(out):
            self.ignored.add(name)
            del out[name]
        return out

    # --- Harmont's graph form ----------------------------------------------------------------

    def _from_graph(self, data: dict[str, Any]) -> dict[str, Any]:
        """Harmont's v0 graph form (petgraph's StableGraph: nodes, edges, node_holes) as our
        step list. Its problems join the steps' field problems, at their places in the graph;
        locations in the step list are mapped back into it."""
        graph = data.pop("graph")
        if not isinstance(graph, Mapping):
            raise self._located(
                BuildFileError.single(
                    "graph must be a mapping with nodes and edges (Harmont's v0 graph form)",
                    loc=("graph",),
                )
            )
        self.graph_form = True
        problems = _graph_field_problems(graph)
        nodes = graph.get("nodes")
        edges = graph.get("edges", [])
        holes = graph.get("node_holes", [])
        if (
            not isinstance(nodes, list)
            or not isinstance(edges, list)
            or not isinstance(holes, list)
        ):
            problems.append(
                Diagnostic(
                    "graph.nodes, graph.edges and graph.node_holes must be lists", loc=("graph",)
                )
            )
            raise self._located(BuildFileError(problems))
        problems.extend(_hole_problems(holes))
        steps = [self._graph_step(slot, node, problems) for slot, node in enumerate(nodes)]
        edge_locs = self._graph_edges(edges, steps, _slot_of_index(len(nodes), holes), problems)
        self.problems.extend(problems)  # reported with the steps' field problems
        data["steps"] = steps
        self.to_source = _graph_to_source(nodes, edge_locs)
        return data

    def _graph_step(self, slot: int, node: object, problems: list[Diagnostic]) -> dict[str, Any]:
        """The step of graph node ``slot``, its env merged in; ``{}`` for a node that is no
        step at all (its problem is reported, not the fields it lacks)."""
        if not isinstance(node, Mapping) or not isinstance(node.get("step"), Mapping):
            problems.append(_not_a_node(slot, node))
            self.bad_steps.add(slot)
            return {}
        node = self._strip(node)  # a node's `secrets` only mean something in the cloud
        for name in sorted(set(node) - {"step", "env"}, key=str):
            problems.append(
                Diagnostic(
                    f"unknown field {name!r} in a graph node; its fields are step, env and secrets",
                    loc=("graph", "nodes", slot, name),
                )
            )
        if node["step"].get("type", "command") == "wait":
            problems.append(
                Diagnostic(
                    "a graph node's step is a wait; the graph form orders steps by its "
                    "edges: remove the node and add depends_on edges instead",
                    loc=("graph", "nodes", slot, "step", "type"),
                )
            )
            self.bad_steps.add(slot)
            return {}
        step = self._strip(node["step"])
        env = node.get("env") or {}
        if isinstance(env, Mapping) and isinstance(step.get("env", {}), Mapping):
            step["env"] = {**env, **step.get("env", {})}
        else:
            step["env"] = env
        return step

    def _graph_edges(
        self,
        edges: list[Any],
        steps: list[dict[str, Any]],
        slot_of_index: Mapping[int, int],
        problems: list[Diagnostic],
    ) -> dict[tuple[int, str], list[Loc]]:
        """Each edge written into its target step (``builds_in`` or one more ``depends_on``);
        returns where in the graph each of those came from: (slot, field) -> edge locations."""
        edge_locs: dict[tuple[int, str], list[Loc]] = {}
        for n, edge in enumerate(edges):
            loc: Loc = ("graph", "edges", n)
            ends = _edge_ends(n, edge, slot_of_index)
            if isinstance(ends, Diagnostic):
                problems.append(ends)
                continue
            src, dst = ends
            if src in self.bad_steps or dst in self.bad_steps:
                continue  # that node's own problem is reported
            source_key, target = steps[src].get("key"), steps[dst]
            if edge[2] == "builds_in":
                if "builds_in" in target:
                    problems.append(
                        Diagnostic(
                            "a step has two builds_in edges; a step builds in one parent: keep one",
                            loc=loc,
                        )
                    )
                    continue
                target["builds_in"] = source_key
                edge_locs[(dst, "builds_in")] = [loc]
            else:
                deps = target.setdefault("depends_on", [])
                if isinstance(deps, str):
                    deps = target["depends_on"] = [deps]
                if isinstance(deps, list):
                    deps.append(source_key)
                    edge_locs.setdefault((dst, "depends_on"), []).append(loc)
        return edge_locs


def _graph_field_problems(graph: Mapping[str, Any]) -> list[Diagnostic]:
    """The graph mapping's own fields: unknown ones, and an edge_property other than directed."""
    problems = [
        Diagnostic(
            f"unknown field {name!r} in graph; its fields are nodes, edges, node_holes, "
            "edge_property",
            loc=("graph", name),
        )
        for name in sorted(set(graph) - _GRAPH_FIELDS, key=str)
    ]
    if graph.get("edge_property", "directed") != "directed":
        problems.append(
            Diagnostic(
                f"edge_property is {graph.get('edge_property')!r}; a build graph is directed: "
                'use "directed"',
                loc=("graph", "edge_property"),
            )
        )
    return problems


_GRAPH_FIELDS = frozenset({"nodes", "edges", "node_holes", "edge_property"})


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hole_problems(holes: list[Any]) -> list[Diagnostic]:
    return [
        Diagnostic(
            f"graph.node_holes[{n}] is {describe_type(hole)} {show_value(hole)}; "
            "node_holes lists the indices (integers from 0) left free by removed "
            "nodes",
            loc=("graph", "node_holes", n),
        )
        for n, hole in enumerate(holes)
        if not _is_index(hole) or hole < 0
    ]


def _slot_of_index(count: int, holes: list[Any]) -> dict[int, int]:
    """Node index -> its place in graph.nodes: petgraph's StableGraph numbers its nodes
    skipping the holes left by removed ones."""
    hole_set = {h for h in holes if _is_index(h)}
    slot_of_index: dict[int, int] = {}
    index = 0
    for slot in range(count):
        while index in hole_set:
            index += 1
        slot_of_index[index] = slot
        index += 1
    return slot_of_index


def _not_a_node(slot: int, node: object) -> Diagnostic:
    """The problem of graph node ``slot``, which is not a mapping with a step mapping."""
    if not isinstance(node, Mapping):
        return Diagnostic(
            f"graph.nodes[{slot}] is {describe_type(node)} {show_value(node)}; a "
            "graph node is a mapping {step: {...}, env: {...}}",
            loc=("graph", "nodes", slot),
        )
    step_value = node.get("step")
    return Diagnostic(
        f"graph.nodes[{slot}].step is {describe_type(step_value)} "
        f"{show_value(step_value)}; it must be a mapping with key and cmd",
        loc=("graph", "nodes", slot, "step") if "step" in node else ("graph", "nodes", slot),
    )


def _edge_ends(
    n: int, edge: object, slot_of_index: Mapping[int, int]
) -> tuple[int, int] | Diagnostic:
    """The (source, target) slots of ``graph.edges[n]``, or what is wrong with it."""
    loc: Loc = ("graph", "edges", n)
    if not (isinstance(edge, list) and len(edge) == 3 and all(_is_index(e) for e in edge[:2])):
        return Diagnostic(
            f"graph.edges[{n}] is {show_value(edge)}; an edge is [from, to, kind] "
            'with the node indices from and to and kind "depends_on" or "builds_in"',
            loc=loc,
        )
    if edge[2] not in ("builds_in", "depends_on"):
        return Diagnostic(
            f"graph.edges[{n}] has the kind {show_value(edge[2])}; an edge's kind is "
            '"depends_on" or "builds_in"',
            loc=(*loc, 2),
        )
    src, dst = slot_of_index.get(edge[0]), slot_of_index.get(edge[1])
    if src is None or dst is None:
        bad = 0 if src is None else 1
        return Diagnostic(
            f"graph.edges[{n}] names the node index {edge[bad]}, which is not a node "
            "of the graph; fix the index or remove the edge",
            loc=(*loc, bad),
        )
    return src, dst


def _graph_to_source(
    nodes: list[Any], edge_locs: Mapping[tuple[int, str], list[Loc]]
) -> Callable[[Loc], Loc]:
    """Maps a location in the step list made from the graph back into the graph: a step's
    field into its node, a builds_in or an added depends_on entry to the edge that made it."""

    def to_source(loc: Loc) -> Loc:
        if len(loc) < 2 or loc[0] != "steps" or not isinstance(loc[1], int):
            return loc
        slot, rest = loc[1], loc[2:]
        if rest[:1] == ("builds_in",) and (slot, "builds_in") in edge_locs:
            return edge_locs[(slot, "builds_in")][0]
        if rest[:1] == ("depends_on",) and len(rest) > 1 and isinstance(rest[1], int):
            mine = edge_locs.get((slot, "depends_on"), [])
            explicit = nodes[slot]["step"].get("depends_on", [])
            k = rest[1] - (len(explicit) if isinstance(explicit, list) else 1)
            if 0 <= k < len(mine):
                return mine[k]
        if rest[:1] == ("env",):
            return ("graph", "nodes", slot, *rest)
        return ("graph", "nodes", slot, "step", *rest)

    return to_source


_STEP_NUMBER = re.compile(r"(?<![\w'\"])step #(\d+)")


def _graph_words(message: str) -> str:
    """A message about steps, in the graph form's words: step #N is node N-1 of graph.nodes."""
    message = _STEP_NUMBER.sub(lambda m: f"graph.nodes[{int(m.group(1)) - 1}]", message)
    return message.replace("a list of steps", "a list of graph nodes")


def _at_mark(name: str, message: str, mark: yaml.Mark | None) -> BuildFileError:
    """An error at a YAML mark (0-based line and column) of file ``name``."""
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return BuildFileError([Diagnostic(message, file=name, line=line, column=column)])


def _error(name: str, message: str) -> BuildFileError:
    return BuildFileError([Diagnostic(message, file=name)])
