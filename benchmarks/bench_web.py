"""The web view benchmark: a 10,000-job build's page and a 200 MB log in Debian's chromium
(Playwright), against a bare FastAPI app serving the same bytes.

    python -m benchmarks.bench_web                        # 10,000 jobs, a 200 MB log, 5 loads
    python -m benchmarks.bench_web --steps 1000 --log-mb 10 --loads 3     # smoke test
    python -m benchmarks.bench_web --screenshots docs/img  # also the README's pictures

What is measured, per load of a page in a new browser context (no cache), median of --loads:

- **build page**: the first contentful paint (``performance`` paint entries) and the time until
  the page's script has drawn the graph's level counts; harmont-exec `serve` against a bare
  FastAPI app that serves the very HTML `serve` rendered (saved once) and the same static
  files. The ratio is what rendering the page from the record adds.
- **long log**: from navigation to the log's last line shown, for a job that wrote --log-mb MB;
  against the bare app serving the last 128 KiB of the same text in a ``<pre>``.

Needs chromium (HARMONT_TEST_CHROMIUM or on PATH; `apt-get install chromium`) and Playwright
(`pip install playwright`). Recording the builds is not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.workload import generate

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO = """\
steps:
  - key: compile
    label: Compile
    command: "printf '\\\\033[1;32mcompiled\\\\033[0m 42 modules\\\\n'"
  - key: unit
    label: Unit tests
    command: |
      echo '--- installing'; echo 'pip install -e .'
      echo '+++ running the tests'
      printf 'test_plan \\033[32mPASSED\\033[0m\\ntest_run \\033[31mFAILED\\033[0m\\n'
      echo 'AssertionError: 2 != 3' >&2; exit 1
    depends_on: compile
  - {key: lint, label: Lint, command: "echo 'All checks passed!'", depends_on: compile}
  - {key: docs, label: Docs, command: "echo built", depends_on: compile}
  - wait
  - {key: package, label: Package, command: "echo packed"}
  - {key: deploy, label: Deploy, command: "echo deployed", depends_on: package}
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "executor", *args], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode not in (0, 1):  # 1: a build that failed on purpose
        raise SystemExit(f"harmont-exec {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited {proc.returncode}")
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.TransportError:
            time.sleep(0.05)  # a server starting: nothing to wait on but its port
    raise SystemExit(f"{url} did not answer within 60 s")


@contextmanager
def _serve(db: Path, cwd: Path) -> Iterator[str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "executor", "serve", "--db", str(db), "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/v0/ping", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def _bare(html: bytes, log_tail: bytes) -> Iterator[str]:
    """A bare FastAPI app: the saved page, the same static files, the log's tail."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    from executor.web.pages import STATIC

    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/page")
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/log")
    async def log() -> HTMLResponse:
        from html import escape

        text = escape(log_tail.decode("utf-8", "replace"))
        return HTMLResponse(f"<!doctype html><pre id=log>{text}</pre>")

    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_http(f"http://127.0.0.1:{port}/page")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _loads(
    browser: Any, n: int, signed_in: Callable[[Any], None], load: Callable[[Any], float]
) -> list[float]:
    times = []
    for _ in range(n):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(120_000)
        signed_in(page)
        times.append(load(page))
        context.close()
    return times


def _fcp(page: Any) -> float:
    value = page.evaluate(
        "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
    )
    return float(value) / 1000 if value else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--log-mb", type=float, default=200.0)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, help="Save the main pages' pictures here.")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("HARMONT_TEST_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("no chromium: apt-get install -y chromium (or set HARMONT_TEST_CHROMIUM)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "db" / "harmont.db"
        import yaml

        (tmp / "big.yaml").write_text(
            yaml.safe_dump(generate("layered", args.steps, seed=0), sort_keys=False)
        )
        size = int(args.log_mb * 1_000_000)
        (tmp / "log.yaml").write_text(
            "steps:\n  - key: long\n    command: "
            f"\"seq 1 100000000 | sed 's/^/log line /' | head -c {size}\"\n"
        )
        (tmp / "demo.yaml").write_text(DEMO)
        started = time.monotonic()
        _cli("run", "big.yaml", "--db", str(db), "-j", "8", cwd=tmp)
        _cli("run", "log.yaml", "--db", str(db), cwd=tmp)
        _cli("run", "demo.yaml", "--db", str(db), cwd=tmp)
        print(f"recorded the builds in {time.monotonic() - started:.0f} s (not timed below)")
        token = _cli("token", "create", "--db", str(db), "--description", "bench", cwd=tmp).strip()
        with _serve(db, tmp) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

            def sign_in(page: Any) -> None:
                page.goto(f"{base}/login")
                page.fill("#token", token)
                page.click("button[type=submit]")
                page.wait_for_url("**/pipelines")

            big_url = f"{base}/local/pipelines/big/builds/1"

            def load_big(page: Any) -> float:
                page.goto(big_url)
                page.wait_for_function(
                    "document.querySelector('#dag [data-counts]') === null || "
                    "document.querySelector('#dag [data-counts]').textContent !== ''"
                )
                return _fcp(page)

            ours = _loads(browser, args.loads, sign_in, load_big)
            page = browser.new_page()
            sign_in(page)
            html = page.request.get(big_url).body()
            page.close()

            def load_log(page: Any) -> float:
                t0 = time.monotonic()
                page.goto(f"{base}/local/pipelines/log/builds/1?job=long")
                page.locator("#log .line").last.wait_for()
                page.wait_for_function("document.getElementById('log').scrollTop > 0")
                return time.monotonic() - t0

            ours_log = _loads(browser, args.loads, sign_in, load_log)
            import httpx

            raw = b""

            job = httpx.get(
                f"{base}/api/v0/organizations/local/pipelines/log/builds/1/jobs",
                headers={"authorization": f"Bearer {token}"},
                timeout=60,
            ).json()["data"][0]["id"]
            with httpx.stream(
                "GET",
                f"{base}/api/v0/organizations/local/pipelines/log/builds/1/jobs/{job}/log",
                headers={"authorization": f"Bearer {token}"},
                timeout=600,
            ) as response:
                for part in response.iter_bytes():
                    raw = (raw + part)[-(128 << 10) :]
            with _bare(html, raw) as bare:

                def bare_page(page: Any) -> float:
                    page.goto(f"{bare}/page")
                    return _fcp(page)

                def bare_log(page: Any) -> float:
                    t0 = time.monotonic()
                    page.goto(f"{bare}/log")
                    page.locator("#log").wait_for()
                    return time.monotonic() - t0

                theirs = _loads(browser, args.loads, lambda page: None, bare_page)
                theirs_log = _loads(browser, args.loads, lambda page: None, bare_log)
            if args.screenshots:
                _screenshots(browser, sign_in, base, token, args.screenshots)
            browser.close()
        print(f"\n{args.steps}-job build page, first contentful paint (median of {args.loads}):")
        print(
            f"  harmont-exec serve   {_median_ms(ours):8.0f} ms   ({len(html) / 1e3:.0f} kB page)"
        )
        print(f"  bare FastAPI, same   {_median_ms(theirs):8.0f} ms")
        print(f"  ratio                {statistics.median(ours) / statistics.median(theirs):8.2f}x")
        print(
            f"\n{args.log_mb:g} MB log, navigation to its last line shown (median of {args.loads}):"
        )
        print(f"  harmont-exec serve   {_median_ms(ours_log):8.0f} ms")
        print(f"  bare FastAPI, 128 KiB tail in a <pre> {_median_ms(theirs_log):8.0f} ms")
        log_ratio = statistics.median(ours_log) / statistics.median(theirs_log)
        print(f"  ratio                {log_ratio:8.2f}x")


def _screenshots(
    browser: Any, sign_in: Callable[[Any], None], base: str, token: str, out: Path
) -> None:
    """The README's pictures: a few more builds of the demo pipeline sent through the API (a
    passing one, a failing one, one still running), then the main pages."""
    import httpx

    out.mkdir(parents=True, exist_ok=True)
    api = httpx.Client(
        base_url=f"{base}/api/v0/organizations/local/pipelines/demo",
        headers={"authorization": f"Bearer {token}"},
        timeout=60,
    )
    sent = [
        ("main", "Merge #41: faster planner", DEMO.replace("exit 1", "exit 0")),
        ("fix/flaky-test", "Retry the flaky test", DEMO),
        ("main", "Nightly: long soak", "steps:\n  - {key: soak, command: 'sleep 60'}\n"),
    ]
    numbers = []
    for n, (branch, message, ir) in enumerate(sent):
        body = {
            "pipeline_ir": ir,
            "branch": branch,
            "message": message,
            "commit": f"{n + 7:x}" * 40,
        }
        created = api.post("/builds", json=body)
        created.raise_for_status()
        numbers.append(created.json()["number"])
    for number in numbers[:2]:
        while not api.get(f"/builds/{number}").json()["finished_at"]:
            time.sleep(0.1)  # a build running in serve: nothing to wait on but its record
    while api.get(f"/builds/{numbers[2]}").json()["state"] != "running":
        time.sleep(0.1)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{base}/login")
    page.screenshot(path=str(out / "web-login.png"))
    sign_in(page)
    page.screenshot(path=str(out / "web-pipelines.png"))
    page.goto(f"{base}/local/pipelines/demo")
    page.screenshot(path=str(out / "web-builds.png"))
    page.goto(f"{base}/local/pipelines/demo/builds/{numbers[1]}?job=unit")
    page.locator("#log .line").last.wait_for()
    page.locator("#log details.group summary").first.click()
    page.screenshot(path=str(out / "web-build.png"), full_page=True)
    page.goto(f"{base}/local/pipelines/big/builds/1")
    page.screenshot(path=str(out / "web-10k.png"))
    context.close()
    api.put(f"/builds/{numbers[2]}/cancel").raise_for_status()
    api.close()
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
