"""The build specification: pydantic models parsed from a build file, and their validation.

``BuildSpec`` is what a build file means once its syntax is gone: command steps and wait
barriers in file order, with normalized policies (every default filled in). This module checks
each field on its own; relations between steps (unknown or cyclic dependencies, duplicate keys)
are the planner's job. Pydantic errors never leave this module: ``parse_build_spec`` turns them
into ``BuildFileError`` diagnostics that say what is wrong and what to do; each pydantic error
type has its message function, found in the ``_MESSAGES`` table (``_message`` dispatches).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from executor.errors import BuildFileError, Diagnostic, Loc

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_RETRY_LIMIT",
    "MAX_TIMEOUT_S",
    "Backoff",
    "BuildSpec",
    "RetryPolicy",
    "SoftFailPolicy",
    "StepSpec",
    "WaitSpec",
    "describe_type",
    "parse_build_spec",
    "show_value",
]

MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_RETRY_LIMIT = 10
MAX_CONCURRENCY = 1024
MAX_BACKOFF_S = 24 * 3600


def _no_control_chars(value: str) -> str:
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"contains the control character {bad!r}")
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL byte, which no process can receive")
    return value


def _env_name(value: str) -> str:
    if "=" in value or "\0" in value:
        raise ValueError("contains '=' or a NUL byte")
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return _no_nul(value)


def _relative_glob(value: str) -> str:
    value = _non_blank(value)
    if value.startswith("/"):
        raise ValueError(f"is {value!r}, which reaches outside the working directory")
    if ".." in value.split("/"):
        raise ValueError(
            f"is {value!r}, which uses '..'; write the path from the working directory "
            "without '..' (artifacts must stay inside it)"
        )
    return value


StepKey = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1, max_length=200),
    AfterValidator(_no_control_chars),
]
EnvName = Annotated[str, Strict(), StringConstraints(min_length=1), AfterValidator(_env_name)]
EnvValue = Annotated[str, Strict(), AfterValidator(_no_nul)]
Env = dict[EnvName, EnvValue]
MAX_RESOURCE = 1e9
ResourceName = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1, max_length=200),
    AfterValidator(_no_control_chars),
    AfterValidator(_non_blank),
]
ResourceAmount = Annotated[float, Strict(), Field(gt=0, le=MAX_RESOURCE, allow_inf_nan=False)]
Seconds = Annotated[float, Strict(), Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
ExitCodes = tuple[int, ...] | Literal["*"]


def _exit_codes(value: object) -> ExitCodes:
    """``"*"`` or a non-empty list of distinct integers 1-255, kept in the user's order."""
    if value == "*":
        return "*"
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f'must be a non-empty list of exit codes or "*", got {show_value(value)}')
    codes: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"contains {show_value(item)}, which is not an integer exit code")
        if not 1 <= item <= 255:
            raise ValueError(f"contains {item}, but exit codes run from 1 to 255")
        if item not in codes:
            codes.append(item)
    return tuple(codes)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backoff(_Spec):
    """Delay before a retry: ``min(max_seconds, initial_seconds * factor**(n-1))``, jittered."""

    initial_seconds: Annotated[float, Strict(), Field(ge=0, le=MAX_BACKOFF_S)] = 0.0
    factor: Annotated[float, Strict(), Field(ge=1, le=100)] = 2.0
    max_seconds: Annotated[float, Strict(), Field(ge=0, le=MAX_BACKOFF_S)] = 300.0
    jitter: Annotated[bool, Strict()] = True


class RetryPolicy(_Spec):
    """How a failed attempt is retried (SPEC §3). Attempts = ``limit + 1``."""

    limit: Annotated[int, Strict(), Field(ge=0, le=MAX_RETRY_LIMIT)] = 0
    exit_codes: ExitCodes = "*"
    on_timeout: Annotated[bool, Strict()] = False
    backoff: Backoff = Backoff()

    _check_codes = field_validator("exit_codes", mode="before")(_exit_codes)

    def retries_exit_code(self, exit_code: int) -> bool:
        return exit_code != 0 and (self.exit_codes == "*" or exit_code in self.exit_codes)


class SoftFailPolicy(_Spec):
    """Which final exit codes count as a soft failure (``"*"``: any non-zero)."""

    exit_codes: ExitCodes = "*"

    _check_codes = field_validator("exit_codes", mode="before")(_exit_codes)

    def matches(self, exit_code: int) -> bool:
        return exit_code != 0 and (self.exit_codes == "*" or exit_code in self.exit_codes)


class StepSpec(_Spec):
    """One command step: becomes one job."""

    key: StepKey
    label: Annotated[str, Strict(), StringConstraints(max_length=1000)] | None = None
    command: Annotated[str, Strict(), AfterValidator(_non_blank)] = Field(
        validation_alias=AliasChoices("command", "cmd")
    )
    depends_on: tuple[StepKey, ...] = ()
    builds_in: StepKey | None = None
    env: Env = Field(default_factory=dict)
    timeout_seconds: Seconds | None = None
    retry_policy: RetryPolicy | None = None
    soft_fail_policy: SoftFailPolicy | None = None
    artifact_paths: tuple[Annotated[str, Strict(), AfterValidator(_relative_glob)], ...] = ()
    allow_dependency_failure: Annotated[bool, Strict()] = False
    # What one attempt needs of a worker, e.g. {cpus: 2}: the Dask executor asks its scheduler
    # for a worker offering that much (SPEC §8); the local executor ignores it.
    resources: dict[ResourceName, ResourceAmount] | None = None

    @model_validator(mode="before")
    @classmethod
    def _reshape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.pop("type", "command") != "command":  # the discriminator only lets "command" in
            raise ValueError("type must be 'command'")
        if "command" in data and "cmd" in data:
            raise ValueError("has both 'command' and its alias 'cmd'; keep only one")
        deps = data.get("depends_on")
        if isinstance(deps, str):
            data["depends_on"] = (deps,)
        elif deps is None and "depends_on" in data:
            data["depends_on"] = ()
        policy = data.get("soft_fail_policy")
        if policy is True:
            data["soft_fail_policy"] = {}
        elif policy is False:
            data["soft_fail_policy"] = None
        if data.get("resources") == {}:
            data["resources"] = None  # asks for nothing: the same as leaving it out
        return data

    @property
    def prerequisites(self) -> tuple[str, ...]:
        """Keys this step waits for by its own fields (``depends_on`` then ``builds_in``)."""
        if self.builds_in is None or self.builds_in in self.depends_on:
            return self.depends_on
        return (*self.depends_on, self.builds_in)


class WaitSpec(_Spec):
    """A barrier: every later step depends on every earlier one."""

    type: Literal["wait"] = "wait"
    continue_on_failure: Annotated[bool, Strict()] = False


def _step_tag(value: Any) -> str | None:
    if isinstance(value, StepSpec):
        return "command"
    if isinstance(value, WaitSpec):
        return "wait"
    if isinstance(value, dict):
        kind = value.get("type", "command")
        return kind if kind in ("command", "wait") else None
    return "command"


Step = Annotated[
    Annotated[StepSpec, Tag("command")] | Annotated[WaitSpec, Tag("wait")],
    Discriminator(
        _step_tag,
        custom_error_type="step_type",
        custom_error_message="unsupported step type",
    ),
]


class BuildSpec(_Spec):
    """A whole build file, validated field by field, in file order. ``steps`` may hold no
    command step: such a build has no jobs and passes at once."""

    version: Literal["0"] = "0"
    env: Env = Field(default_factory=dict)
    timeout_seconds: Seconds | None = None
    concurrency: Annotated[int, Strict(), Field(ge=1, le=MAX_CONCURRENCY)] | None = None
    steps: tuple[Step, ...]

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return "0" if value == 0 and not isinstance(value, bool) else value

    @field_validator("steps", mode="before")
    @classmethod
    def _waits(cls, value: Any) -> Any:
        # No command step at all is a valid pipeline (Harmont's too): its build has no jobs
        # and passes at once.
        if isinstance(value, list | tuple):
            return [{"type": "wait"} if s == "wait" else s for s in value]
        return value

    @property
    def command_steps(self) -> tuple[StepSpec, ...]:
        return tuple(s for s in self.steps if isinstance(s, StepSpec))

    def to_data(self) -> dict[str, Any]:
        """The build as plain data in our file format, defaults left out; loads back equal."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"steps"})
        steps: list[Any] = []
        for step in self.steps:
            if isinstance(step, WaitSpec):
                steps.append(
                    {"type": "wait", "continue_on_failure": True}
                    if step.continue_on_failure
                    else "wait"
                )
            else:
                steps.append(step.model_dump(mode="json", exclude_defaults=True))
        data["steps"] = steps
        return data


# --- pydantic errors -> diagnostics ----------------------------------------------------------

_HINTS: Mapping[str, str] = {
    "version": 'use version: "0" or leave it out',
    "env": 'use a mapping of names to string values; quote numbers and booleans, e.g. CI: "true"',
    "timeout_seconds": f"use a number of seconds above 0 and at most {MAX_TIMEOUT_S} (7 days), "
    "or leave it out",
    "concurrency": f"use an integer from 1 to {MAX_CONCURRENCY}, or leave it out to use the "
    "number of CPUs",
    "steps": "use a list of steps, each a mapping with key and command, or the word wait",
    "key": "use 1-200 characters without control characters, unique in the build",
    "label": "use a short string",
    "command": "use one shell string, e.g. command: make test; put several commands on "
    "separate lines with `command: |`",
    "depends_on": "use a step key or a list of step keys",
    "builds_in": "use the key of one step",
    "retry_policy": "use a mapping with limit, exit_codes, on_timeout, backoff",
    "soft_fail_policy": 'use true, or a mapping like {exit_codes: [3]} or {exit_codes: "*"}',
    "limit": f"use an integer from 0 to {MAX_RETRY_LIMIT} (attempts = limit + 1)",
    "exit_codes": 'use a list of integers from 1 to 255, or "*" for any non-zero exit',
    "on_timeout": "use true or false",
    "backoff": "use a mapping with initial_seconds, factor, max_seconds, jitter",
    "initial_seconds": f"use a number of seconds from 0 to {MAX_BACKOFF_S}",
    "max_seconds": f"use a number of seconds from 0 to {MAX_BACKOFF_S}",
    "factor": "use a number from 1 to 100",
    "jitter": "use true or false",
    "artifact_paths": "use a list of glob patterns relative to the working directory, "
    'e.g. ["reports/**/*.xml"]',
    "allow_dependency_failure": "use true or false",
    "resources": "use a mapping of resource names to amounts above 0, e.g. {cpus: 2}, as "
    "offered by the Dask workers (dask worker --resources cpus=2); the local executor ignores it",
    "continue_on_failure": "use true or false",
}

_FIELDS: Mapping[str, tuple[str, ...]] = {
    "build": tuple(BuildSpec.model_fields),
    "command": (*(f for f in StepSpec.model_fields if f != "command"), "command", "cmd", "type"),
    "wait": ("type", "continue_on_failure"),
    "retry_policy": tuple(RetryPolicy.model_fields),
    "soft_fail_policy": tuple(SoftFailPolicy.model_fields),
    "backoff": tuple(Backoff.model_fields),
}

_KINDS: Mapping[str, str] = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def show_value(value: object) -> str:
    """A value from a build file, for a message: its repr, cut at 80 characters; null as
    "(null)"."""
    if value is None:
        return "(null)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_type(value: object) -> str:
    """What kind of value it is, in the build file's words (mapping, list, string, ...)."""
    if value is None:
        return "nothing"
    names = {
        dict: "mapping",
        list: "list",
        tuple: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }
    return names.get(type(value), type(value).__name__)


_NESTED = ("retry_policy", "soft_fail_policy", "backoff")


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[Loc, str]:
    """Drop pydantic's union tags from ``loc``; return it and the kind of object it points into."""
    out: list[int | str] = []
    kind = "build"
    for i, part in enumerate(loc):
        if i == 2 and loc[0] == "steps" and part in ("command", "wait"):
            kind = str(part)
            continue
        # the last part may be the offending key itself, not an object it points into
        last = i == len(loc) - 1
        if not last and isinstance(part, str) and part in _NESTED:
            kind = part
        out.append(part)
    return tuple(out), kind


_MAPPINGS = ("env", "resources")  # fields whose keys are the user's names, not field names


def _field_of(loc: Loc) -> str | None:
    names = [p for p in loc if isinstance(p, str)]
    if len(names) >= 2 and names[-2] in _MAPPINGS and loc and loc[-1] == names[-1]:
        return names[-2]
    return names[-1] if names else None


class _Problem(NamedTuple):
    """One pydantic error and what its message is made of."""

    err: Mapping[str, Any]
    type: str
    value: object  # the offending input
    loc: Loc
    kind: str  # the kind of object the error points into ("build", "command", "backoff", ...)
    field: str | None
    where: str  # the path inside its step (or the build), as the message names it
    hint: str  # what to write instead (_HINTS)

    @property
    def is_step(self) -> bool:
        """The error is about a whole step (``steps[n]``), not one of its fields."""
        return len(self.loc) == 2 and self.loc[0] == "steps"


def _message(err: Mapping[str, Any], loc: Loc, kind: str) -> str:
    """The diagnostic's message for pydantic error ``err`` at ``loc`` (``_clean_loc``'s)."""
    if loc and loc[-1] == "[key]":  # a mapping key: a resource's or an env variable's name
        return _key_message(err["type"], loc, err.get("input"))
    field = _field_of(loc)
    inner = loc[2:] if len(loc) > 2 and loc[0] == "steps" else loc
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner).lstrip(".")
    hint = _HINTS.get("command" if field == "cmd" else field or "", "")
    problem = _Problem(
        err, err["type"], err.get("input"), loc, kind, field, where or "the build", hint
    )
    handler = _MESSAGES.get(problem.type)
    message = handler(problem) if handler is not None else None
    return message if message is not None else _other_message(problem)


def _key_message(etype: str, loc: Loc, value: object) -> str:
    name = loc[-2]
    if len(loc) >= 3 and loc[-3] == "resources":
        if etype == "string_type":
            return f"resource name {name!r} must be a string, got {describe_type(value)}; quote it"
        return (
            f"resource name {show_value(name)} is empty or has control characters; name the "
            f"resource as the Dask workers offer it, e.g. cpus"
        )
    if etype == "string_type":
        return f"env name {name!r} must be a string, got {describe_type(value)}; quote it"
    if etype == "string_too_short":
        return "env has a variable with an empty name; give it a name or remove it"
    return f"env name {name!r} contains '=' or a NUL byte; rename the variable"


def _unknown_field(p: _Problem) -> str:
    name = str(p.loc[-1])
    allowed = _FIELDS.get(p.kind, ())
    close = difflib.get_close_matches(name, allowed, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    owner = {"command": "step", "wait": "wait step"}.get(p.kind, p.kind.replace("_", " "))
    if p.kind == "build":
        owner = "build file"
    return f"unknown field {name!r}; {guess}fields of a {owner} are: {', '.join(allowed)}"


def _missing_field(p: _Problem) -> str:
    if p.field == "command":
        return "has no command; add `command: <shell command>` (or `cmd:`)"
    if p.field == "key":
        return "has no key; add `key: <unique name>` so other steps and the record can name it"
    return f"missing required field {p.field!r}; {p.hint}"


def _unknown_step_type(p: _Problem) -> str:
    if isinstance(p.value, dict):
        return (
            f"step type {show_value(p.value.get('type'))} is not supported; harmont-exec runs "
            "command steps (type: command) and barriers (type: wait)"
        )
    return (
        f"step is {show_value(p.value)}; a step is a mapping with key and command, or the word wait"
    )


def _bad_version(p: _Problem) -> str | None:
    if p.field != "version":
        return None
    return f'version is {show_value(p.value)}; the only build-file version is "0": {p.hint}'


def _wrong_kind(p: _Problem) -> str:
    """A value of the wrong type (``_KINDS``): a step that is no mapping, an env value that
    is no string, a command given as a list, ..."""
    value, hint = p.value, p.hint
    if p.is_step:
        guess = (
            "did you mean wait? "
            if isinstance(value, str) and difflib.get_close_matches(value, ["wait"])
            else ""
        )
        return (
            f"step #{int(p.loc[1]) + 1} is {describe_type(value)} {show_value(value)}; {guess}"
            "a step is a mapping with key and command, or the word wait"
        )
    if p.field == "env" and p.loc[-1] != "env":
        return (
            f"env value {p.loc[-1]!s} must be a string, got {describe_type(value)} "
            f"{show_value(value)}; {_HINTS['env']}"
        )
    if p.field in ("command", "cmd") and isinstance(value, list):
        return (
            f"command must be one shell string, got a list {show_value(value)}; join the "
            "commands with && or write them on separate lines under `command: |`"
        )
    if isinstance(value, str) and p.type in ("int_type", "float_type") and _numeric(value):
        hint = f"YAML 1.1 reads {value} as text: write it as 1000 or 1.0e+3; {hint}"
    got = f"{describe_type(value)} {show_value(value)}"
    return f"{p.where} must be {_KINDS[p.type]}, got {got}; {hint}"


def _invalid_value(p: _Problem) -> str:
    """One of our validators refused the value (its ValueError says how)."""
    detail = str(p.err.get("msg", "is invalid")).removeprefix("Value error, ")
    if p.is_step:
        return detail
    if not p.loc:
        return f"the build {detail}"
    return f"{p.where} {detail}; {p.hint}" if p.hint else f"{p.where} {detail}"


def _long_key(p: _Problem) -> str | None:
    if p.field != "key":
        return None
    return f"key {show_value(p.value)} is longer than 200 characters; {p.hint}"


_BOUNDS: Mapping[str, tuple[str, str]] = {
    "greater_than_equal": ("must be at least", "ge"),
    "less_than_equal": ("must be at most", "le"),
    "greater_than": ("must be above", "gt"),
    "less_than": ("must be below", "lt"),
}


def _other_message(p: _Problem) -> str:
    """Any other error: a bound (``_BOUNDS``) or pydantic's own words, with the hint."""
    detail = str(p.err.get("msg", "is invalid"))
    if p.type in _BOUNDS:
        words, name = _BOUNDS[p.type]
        ctx = p.err.get("ctx") or {}
        detail = f"{words} {ctx.get(name):g}"
    detail = detail[:1].lower() + detail[1:]
    if p.hint:
        return f"{p.where} is {show_value(p.value)}: {detail}; {p.hint}"
    return f"{p.where}: {detail}"


# pydantic error type -> its message; None from one: the general message (_other_message).
_MESSAGES: Mapping[str, Callable[[_Problem], str | None]] = {
    "extra_forbidden": _unknown_field,
    "missing": _missing_field,
    "step_type": _unknown_step_type,
    "literal_error": _bad_version,
    "value_error": _invalid_value,
    "string_too_long": _long_key,
    **dict.fromkeys(_KINDS, _wrong_kind),
}


def _step_key_at(data: Mapping[str, Any], loc: Loc) -> str | None:
    if len(loc) < 2 or loc[0] != "steps" or not isinstance(loc[1], int):
        return None
    steps = data.get("steps")
    if not isinstance(steps, list | tuple) or not 0 <= loc[1] < len(steps):
        return None
    step = steps[loc[1]]
    key = step.get("key") if isinstance(step, dict) and step.get("type") != "wait" else None
    return key if isinstance(key, str) else None


def diagnostics_from(exc: ValidationError, data: Mapping[str, Any]) -> list[Diagnostic]:
    """Translate a pydantic ``ValidationError`` on ``data`` into our diagnostics."""
    out: list[Diagnostic] = []
    errors = [(err, *_clean_loc(tuple(err["loc"]))) for err in exc.errors(include_url=False)]
    # A misspelt field ("comand") also shows up as a missing one ("command"): report it once.
    misspelt = {
        (loc[:-1], guess)
        for err, loc, kind in errors
        if err["type"] == "extra_forbidden"
        for guess in difflib.get_close_matches(str(loc[-1]), _FIELDS.get(kind, ()), n=1)
    }
    for err, loc, kind in errors:
        if err["type"] == "missing" and (loc[:-1], loc[-1]) in misspelt:
            continue
        out.append(Diagnostic(_message(err, loc, kind), loc=loc, step_key=_step_key_at(data, loc)))
    return out


def parse_build_spec(data: object) -> BuildSpec:
    """Validate plain data (our build-file format) into a ``BuildSpec``; ``BuildFileError`` if bad.

    Checks fields one by one; dependencies between steps are checked by ``executor.build_plan``.
    """
    if not isinstance(data, Mapping):
        raise BuildFileError.single(
            f"the build file must be a mapping with a `steps` list, got {describe_type(data)}; "
            "start the file with `steps:`"
        )
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as exc:
        raise BuildFileError(diagnostics_from(exc, data)) from None
