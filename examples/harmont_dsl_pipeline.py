"""A small CI pipeline written with Harmont's Python DSL (`pip install harmont`).

Its output is committed as harmont-graph-ir.json: the graph form of Harmont's v0 IR, which
harmont-exec loads unchanged. Regenerate it from the examples/ directory:

    python3 harmont_dsl_pipeline.py > harmont-graph-ir.json

then `harmont-exec plan examples/harmont-graph-ir.json` and
`harmont-exec run examples/harmont-graph-ir.json` (expected exit code: 0).

The DSL stamps `image: ubuntu:24.04` on root steps; that field only means something in
Harmont's cloud, so harmont-exec ignores it with a warning. The commands need only python3,
/bin/sh and coreutils, run in examples/, and write only under .harmont-example/graph-ir/.
"""

from __future__ import annotations

from typing import Any

import harmont as hm

SCRATCH = ".harmont-example/graph-ir"


def build_pipeline() -> dict[str, Any]:
    setup = hm.sh(f"rm -rf {SCRATCH} && mkdir -p {SCRATCH}", label="Prepare scratch", key="setup")
    # Chaining .sh() makes `compile` build in `setup` (a builds_in edge).
    compiled = setup.sh(
        "python3 -m compileall -q sample_project",
        label="Byte-compile",
        key="compile",
        env={"PYTHONPYCACHEPREFIX": f"{SCRATCH}/pycache"},
    )
    # .fork() branches: `unit` and `smoke` both build in `compile` and may run side by side.
    branch = compiled.fork()
    unit = hm.timeout(
        "60s",
        branch.sh("python3 -m unittest discover -s sample_project", label="Unit tests", key="unit"),
    )
    smoke = branch.sh(
        "test \"$(echo 'a b a' | python3 -m wordcount --top 1)\" = '2 a'",
        label="CLI smoke test",
        key="smoke",
        env={"PYTHONPATH": "sample_project"},
    )
    # After the wait barrier: `package` depends on every step before it.
    package = hm.sh(
        f"python3 -m tarfile -c {SCRATCH}/wordcount.tar.gz sample_project/wordcount/*.py",
        label="Package",
        key="package",
    )
    return hm.pipeline(
        [unit, smoke, hm.wait(), package],
        env={"CI": "true", "PYTHONDONTWRITEBYTECODE": "1"},
        timeout="5m",
    )


def main() -> None:
    pipeline = build_pipeline()
    print(hm.pipeline_to_json(pipeline, now=0, pipeline_org="local", pipeline_slug="example"))


if __name__ == "__main__":
    main()
