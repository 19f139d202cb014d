"""A Plan as text: a readable outline, JSON-ready data, Graphviz dot and Mermaid.

Pure string building; printing is the CLI's job.
"""

from __future__ import annotations

import json
from typing import Any

from executor.model import StepSpec
from executor.plan import Edge, EdgeKind, Plan

__all__ = ["plan_to_data", "plan_to_dot", "plan_to_mermaid", "plan_to_text"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _codes(codes: object) -> str:
    return "any" if codes == "*" else ",".join(str(c) for c in codes)  # type: ignore[attr-defined]


def _policies(step: StepSpec) -> list[str]:
    notes = []
    if step.timeout_seconds is not None:
        notes.append(f"timeout {_seconds(step.timeout_seconds)}")
    if step.retry_policy is not None and step.retry_policy.limit:
        policy = step.retry_policy
        on_timeout = ", on timeout" if policy.on_timeout else ""
        notes.append(f"retry x{policy.limit} on exit {_codes(policy.exit_codes)}{on_timeout}")
    if step.soft_fail_policy is not None:
        notes.append(f"soft-fail on exit {_codes(step.soft_fail_policy.exit_codes)}")
    if step.allow_dependency_failure:
        notes.append("runs even if prerequisites fail")
    if step.artifact_paths:
        notes.append(f"artifacts {', '.join(step.artifact_paths)}")
    return notes


def _edge_note(edge: Edge) -> str:
    if edge.kinds == (EdgeKind.WAIT,):
        return f"{edge.source} (wait{', continue on failure' if edge.continue_on_failure else ''})"
    if EdgeKind.BUILDS_IN in edge.kinds:
        return f"{edge.source} (builds in)"
    return edge.source


def plan_to_text(plan: Plan, *, name: str | None = None) -> str:
    """Levels, each job with its label, prerequisites and policies, for a person to read."""
    spec = plan.spec
    incoming: dict[str, list[Edge]] = {}
    for edge in plan.edges:
        incoming.setdefault(edge.target, []).append(edge)
    path = plan.critical_path
    head = f"{name}: " if name else ""
    if not len(plan):
        return f"{head}no jobs: the build has no command step, so it passes at once\n"
    lines = [
        f"{head}{_count(len(plan), 'job')} in {_count(len(plan.levels), 'level')}; "
        f"critical path ({_count(len(path), 'job')}): {' -> '.join(path)}",
        "concurrency: "
        + (str(spec.concurrency) if spec.concurrency else "number of CPUs")
        + "; build timeout: "
        + (_seconds(spec.timeout_seconds) if spec.timeout_seconds else "none"),
    ]
    width = min(32, max(len(k) for k in plan.order))
    label_width = min(32, max((len(s.label or "") for s in plan), default=0))
    for number, level in enumerate(plan.levels):
        lines.append("")
        lines.append(f"level {number}")
        for key in level:
            step = plan.step(key)
            parts = [f"  {key:<{width}}"]
            if label_width:
                label = " ".join((step.label or "").split())  # one line, whatever it holds
                parts.append(f"  {label:<{label_width}}")
            after = [_edge_note(e) for e in incoming.get(key, [])]
            if after:
                parts.append(f"  after {', '.join(after)}")
            notes = _policies(step)
            if notes:
                parts.append(f"  [{'; '.join(notes)}]")
            lines.append("".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def plan_to_data(plan: Plan) -> dict[str, Any]:
    """The normalized plan as JSON-ready data (steps in plan order, every default filled in)."""
    spec = plan.spec
    steps = []
    for step in plan:
        data = step.model_dump(mode="json")
        data["depends_on"] = list(plan.prerequisites(step.key))
        data["level"] = plan.level(step.key)
        steps.append(data)
    return {
        "file": str(plan.source) if plan.source else None,
        "version": spec.version,
        "env": spec.env,
        "timeout_seconds": spec.timeout_seconds,
        "concurrency": spec.concurrency,
        "steps": steps,
        "order": list(plan.order),
        "levels": [list(level) for level in plan.levels],
        "critical_path": list(plan.critical_path),
        "edges": [
            {
                "from": e.source,
                "to": e.target,
                "kinds": [k.value for k in e.kinds],
                "continue_on_failure": e.continue_on_failure,
                "tolerant": e.tolerant,
            }
            for e in plan.edges
        ],
    }


def _dot_id(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a double-quoted, backslash-escaped string


def plan_to_dot(plan: Plan) -> str:
    """Graphviz: solid = depends_on, bold = builds_in, dashed = wait, grey = continue on failure."""
    lines = ["digraph build {", "  rankdir=LR;", '  node [shape=box, fontname="sans-serif"];']
    for step in plan:
        label = f"{step.key}\n{step.label}" if step.label and step.label != step.key else step.key
        lines.append(f"  {_dot_id(step.key)} [label={_dot_id(label)}];")
    for edge in plan.edges:
        attrs = []
        if EdgeKind.BUILDS_IN in edge.kinds:
            attrs.append("style=bold")
        elif edge.kinds == (EdgeKind.WAIT,):
            attrs.append("style=dashed")
        if edge.tolerant:
            attrs.append("color=grey50")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"  {_dot_id(edge.source)} -> {_dot_id(edge.target)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_label(text: str) -> str:
    escaped = "".join(f"#{ord(c)};" if c in '"<>#&' else c for c in text)
    return escaped.replace("\n", " ")


def plan_to_mermaid(plan: Plan) -> str:
    """Mermaid flowchart: solid = depends_on, thick = builds_in, dotted = wait barrier."""
    ids = {key: f"n{n}" for n, key in enumerate(plan.order)}
    lines = ["flowchart LR"]
    for step in plan:
        label = step.key if not step.label else f"{step.key}: {step.label}"
        lines.append(f'  {ids[step.key]}["{_mermaid_label(label)}"]')
    for edge in plan.edges:
        if EdgeKind.BUILDS_IN in edge.kinds:
            arrow = "==>"
        elif edge.kinds == (EdgeKind.WAIT,):
            arrow = "-. continue .->" if edge.continue_on_failure else "-.->"
        else:
            arrow = "-->"
        lines.append(f"  {ids[edge.source]} {arrow} {ids[edge.target]}")
    return "\n".join(lines) + "\n"
