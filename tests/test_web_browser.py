"""The web view in a real browser (SPEC §9): Playwright from PyPI driving Debian's chromium
against a real `harmont-exec serve` on a loopback port, which runs the builds the tests send
it through the API.

Every page a test opens is watched: a JavaScript error, a failed console call or a request to
any host but the server's fails the test (``page`` fixture). Waits are Playwright's bounded
waits on what the page shows, never sleeps. One server for the module, on SQLite: the pages
read through the API's lookups, which every store test runs on both backends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import absent
from tests.serving import TIMEOUT_S, create_token, free_port, output, poll, start, stop

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM_ENV = "HARMONT_TEST_CHROMIUM"
"""The chromium to drive (.ci/run installs Debian's and sets it); else `chromium` on PATH."""
WAIT_MS = 30_000  # a page shows what it waits for within seconds; 30 s is only reached by a bug
_LINK = re.compile(r"(http://127\.0\.0\.1:\d+/login\?once=[A-Za-z0-9_-]+)")


def _chromium() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium")
    if not path:
        absent(
            f"no chromium: {CHROMIUM_ENV} is not set and none is on PATH, so the web view is "
            "not tested in a browser; install it with: apt-get install -y chromium"
        )
    return path


@dataclass
class Serve:
    base: str
    api: str
    db: Path
    token: str
    link: str
    work: Path
    http: httpx.Client = field(repr=False)

    def call(self, method: str, path: str, status: int, body: Any = None) -> Any:
        response = self.http.request(method, f"{self.api}{path}", json=body)
        assert response.status_code == status, response.text
        return response.json()

    def build(self, pipeline: str, ir: str, **fields: Any) -> dict[str, Any]:
        """createBuild: the build is queued in serve, which runs it."""
        body = {"pipeline_ir": ir, "message": fields.pop("message", "from a test"), **fields}
        created: dict[str, Any] = self.call(
            "POST", f"/organizations/local/pipelines/{pipeline}/builds", 201, body
        )
        return created

    def ended(self, pipeline: str, number: int) -> dict[str, Any]:
        path = f"/organizations/local/pipelines/{pipeline}/builds/{number}"

        def over() -> dict[str, Any] | None:
            build: dict[str, Any] = self.call("GET", path, 200)
            return build if build["finished_at"] else None

        return poll(over, f"build #{number} of {pipeline} to end")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    work = tmp_path_factory.mktemp("web")
    db = work / "db" / "harmont.db"
    token = create_token(db, cwd=work)
    port = free_port()
    out = work / "serve"
    proc = start(["serve", "--db", str(db), "--port", str(port), "--max-builds", "4"], work, out)
    base = f"http://127.0.0.1:{port}"
    try:

        def listening() -> str | None:
            found = _LINK.search(output(out))
            if not found:
                return None
            try:
                httpx.get(f"{base}/api/v0/ping", timeout=10)
            except httpx.TransportError:
                return None
            return found.group(1)

        link = poll(listening, "serve to listen and print its sign-in link", (proc, out))
        http = httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=TIMEOUT_S)
        served = Serve(base, f"{base}/api/v0", db, token, link, work, http)
        for name in ("app", "hostile", "live", "big"):
            served.call(
                "POST",
                "/organizations/local/pipelines",
                201,
                {
                    "name": name,
                    "repository": "https://example.invalid/r.git",
                    "default_branch": "main",
                },
            )
        yield served
        http.close()
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield launched
        launched.close()


@dataclass
class Watched:
    """What a page did that it must not: script errors, console errors, other hosts."""

    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser: Any, serve: Serve) -> Iterator[Any]:
    """A new browser context (no cookie) and page, watched; signed out."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    watched = Watched()
    own = urlsplit(serve.base).netloc
    tab.on("pageerror", lambda exc: watched.errors.append(f"pageerror: {exc}"))

    def console(msg: Any) -> None:
        # A page answered 4xx on purpose (a refused sign-in) is logged by the browser as a
        # failed load of the document itself: not an error of the page's.
        if msg.type != "error" or (
            msg.text.startswith("Failed to load resource") and msg.location.get("url") == tab.url
        ):
            return
        watched.errors.append(f"console.{msg.type}: {msg.text}")

    tab.on("console", console)

    def route(r: Any) -> None:
        netloc = urlsplit(r.request.url).netloc
        if netloc != own and not r.request.url.startswith(("data:", "blob:", "about:")):
            watched.foreign.append(r.request.url)
            r.abort()
        else:
            r.continue_()

    context.route("**/*", route)
    tab.watched = watched
    yield tab
    context.close()
    assert watched.foreign == [], f"requests left the server: {watched.foreign}"
    assert watched.errors == [], f"the page had errors: {watched.errors}"


def _sign_in(page: Any, serve: Serve) -> None:
    page.goto(f"{serve.base}/login")
    page.fill("#token", serve.token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/local/pipelines$"))


# --- sign-in ---------------------------------------------------------------------------------


def test_web_a_page_without_a_session_asks_to_sign_in_then_returns_there(
    page: Any, serve: Serve
) -> None:
    page.goto(f"{serve.base}/local/pipelines/app")
    assert urlsplit(page.url).path == "/login"
    page.fill("#token", serve.token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/local/pipelines/app$"))
    cookie = next(c for c in page.context.cookies() if c["name"] == "harmont_session")
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert serve.token not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # no script can read it


def test_web_a_link_followed_from_another_site_opens_the_page_when_signed_in(
    page: Any, serve: Serve
) -> None:
    # The SameSite=Strict cookie does not go with a navigation from another site: the sign-in
    # page asks, same-origin, and goes on to the page.
    _sign_in(page, serve)
    target = f"{serve.base}/local/pipelines/app"
    page.goto(f"data:text/html,<a id=go href='{target}'>build</a>")
    page.click("#go")
    page.wait_for_url(target)
    assert page.locator("h1").inner_text().startswith("app")


def test_web_a_wrong_token_is_refused_with_what_to_do(page: Any, serve: Serve) -> None:
    page.goto(f"{serve.base}/login")
    page.fill("#token", "hm_" + "x" * 43)
    page.click("button[type=submit]")
    alert = page.locator("[role=alert]")
    assert "not known here" in alert.inner_text()
    assert "harmont-exec token create" in alert.inner_text()
    assert page.context.cookies() == []


def test_web_the_one_time_link_signs_in_once(browser: Any, serve: Serve) -> None:
    first = browser.new_context()
    tab = first.new_page()
    tab.goto(serve.link)
    tab.wait_for_url(re.compile(r"/local/pipelines$"))
    assert tab.locator("h1").inner_text().startswith("local")
    first.close()
    second = browser.new_context()
    tab = second.new_page()
    response = tab.goto(serve.link)
    assert response is not None and response.status == 401
    assert "used already" in tab.locator("[role=alert]").inner_text()
    assert second.cookies() == []
    second.close()


# --- the builds list ---------------------------------------------------------------------------


def test_web_the_builds_list_gains_a_build_started_meanwhile(page: Any, serve: Serve) -> None:
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/app")
    before = page.locator("#build-rows tr[data-number]").count()
    created = serve.build("app", "steps:\n  - {key: quick, command: 'true'}\n")
    row = page.locator(f'#build-rows tr[data-number="{created["number"]}"]')
    row.wait_for()
    assert page.locator("#build-rows tr[data-number]").count() == before + 1
    serve.ended("app", created["number"])
    row.locator(".state.s-passed").wait_for()  # and its state follows, still without a reload


# --- the build page ------------------------------------------------------------------------------

FAILING = """\
steps:
  - {key: compile, label: Compile, command: "echo compiled"}
  - key: unit
    label: Unit tests
    command: "echo '--- running tests'; echo ok; echo 'boom' >&2; exit 3"
    depends_on: compile
  - {key: lint, command: "echo clean", depends_on: compile}
  - wait
  - {key: package, command: "echo packed"}
  - {key: deploy, command: "echo deploy", depends_on: package}
"""


def test_web_a_failed_build_shows_every_job_the_graph_and_the_skip_reason(
    page: Any, serve: Serve
) -> None:
    created = serve.build("app", FAILING)
    ended = serve.ended("app", created["number"])
    assert ended["state"] == "failed"
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/app/builds/{created['number']}")
    assert page.locator("#build-state").inner_text().endswith("failed")
    keys = ["compile", "unit", "lint", "package", "deploy"]
    rows = page.locator("#jobs tr[data-job]")
    assert rows.count() == len(keys)
    assert [rows.nth(i).locator("td").first.inner_text().split()[0] for i in range(5)] == keys
    for key in keys:
        assert page.locator(f'#dag [data-node="{key}"]').count() == 1
    assert page.locator("#dag .barrier").count() == 1  # the wait
    (barrier,) = [b.get_attribute("data-node") for b in page.locator("#dag .barrier").all()]
    links = {
        (link.get_attribute("data-from"), link.get_attribute("data-to"))
        for link in page.locator("#dag .link").all()
    }
    assert links == {
        ("compile", "unit"),
        ("compile", "lint"),
        *((k, barrier) for k in ("compile", "unit", "lint")),  # the wait: 3 in, 2 out
        (barrier, "package"),
        (barrier, "deploy"),
        ("package", "deploy"),
    }
    unit = page.locator('#dag [data-node="unit"]')
    assert "s-failed" in (unit.get_attribute("class") or "")
    skipped = page.locator("#jobs tr", has_text="package")
    assert "skipped" in skipped.locator('[data-field="state"]').inner_text()
    assert "'unit' failed" in skipped.locator('[data-field="note"]').inner_text()
    # the timeline has a bar per attempt that ran (compile, unit, lint)
    assert page.locator("svg.timeline rect.bar").count() == 3
    # a node opens its job's log
    page.locator('#dag a:has([data-node="unit"])').click()
    page.wait_for_url(re.compile(r"\?job=unit"))
    boom = page.locator("#log .line.stderr", has_text="boom")
    boom.wait_for(state="attached")
    group = page.locator("#log details.group")
    assert group.count() == 1 and "running tests" in group.locator("summary").inner_text()
    assert not boom.is_visible()  # a "--- " group starts folded
    group.locator("summary").click()
    boom.wait_for()  # and unfolds


def test_web_a_running_build_updates_its_log_and_states_without_a_reload(
    page: Any, serve: Serve, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    ir = (
        "steps:\n  - key: slow\n    command: |\n"
        "      echo first line\n"
        f"      while [ ! -e {release} ]; do sleep 0.05; done\n"
        "      printf '\\033[32msecond line\\033[0m\\n'\n"
        "  - {key: after, command: 'echo after', depends_on: slow}\n"
    )
    created = serve.build("live", ir)
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/live/builds/{created['number']}?job=slow")
    page.locator("#log .line", has_text="first line").wait_for()
    page.locator('#dag [data-node="slow"].s-running').wait_for()
    page.evaluate("window.__sameDocument = true")
    release.write_text("go")
    page.locator("#log .line .fg-green", has_text="second line").wait_for()
    page.locator('#dag [data-node="after"].s-passed').wait_for()
    page.locator("#build-state.s-passed").wait_for()
    # the parts the server renders again: the timeline gains the second job's bar, and the
    # jobs table its duration
    expect = playwright_sync.expect
    expect(page.locator("svg.timeline rect.bar")).to_have_count(2, timeout=WAIT_MS)
    after = page.locator("#jobs tr", has_text="after").locator('[data-field="duration"]')
    expect(after).to_have_text(re.compile(r"^[0-9.]+m?s$"), timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert page.locator("#log-state").inner_text().endswith("passed")


def test_web_cancel_cancels_a_running_build_and_the_record_says_so(
    page: Any, serve: Serve, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    ir = f"steps:\n  - {{key: hang, command: 'touch {started}; sleep 600'}}\n"
    created = serve.build("live", ir)
    poll(lambda: True if started.exists() else None, "the job to start")
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/live/builds/{created['number']}")
    page.click("#cancel")
    page.locator("#build-state.s-canceled").wait_for()
    ended = serve.ended("live", created["number"])
    assert ended["state"] == "canceled"
    jobs = serve.call(
        "GET", f"/organizations/local/pipelines/live/builds/{created['number']}/jobs", 200
    )
    assert [(j["state"], j["error_code"]) for j in jobs["data"]] == [("canceled", "build_canceled")]


def test_web_retry_failed_creates_the_new_build(page: Any, serve: Serve) -> None:
    created = serve.build("app", FAILING)
    serve.ended("app", created["number"])
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/app/builds/{created['number']}")
    page.click("#retry-failed")
    page.wait_for_url(re.compile(r"/builds/(\d+)$"))
    number = int(page.url.rsplit("/", 1)[1])
    assert number > created["number"]
    serve.ended("app", number)
    jobs = serve.call("GET", f"/organizations/local/pipelines/app/builds/{number}/jobs", 200)
    states = {j["step_key"]: j["state"] for j in jobs["data"]}
    assert states["compile"] == "passed" and states["unit"] == "failed"


def test_web_an_action_without_the_sessions_csrf_token_is_refused(page: Any, serve: Serve) -> None:
    created = serve.build("app", "steps:\n  - {key: quick, command: 'true'}\n")
    serve.ended("app", created["number"])
    _sign_in(page, serve)
    response = page.request.post(
        f"{serve.base}/local/pipelines/app/builds/{created['number']}/retry",
        form={"csrf": "forged", "failed_only": "false"},
    )
    assert response.status == 403
    assert "csrf_failed" in response.text()
    after = serve.call("GET", "/organizations/local/pipelines/app/builds?limit=1", 200)
    assert after["data"][0]["number"] == created["number"]  # nothing was created


# --- hostile strings ---------------------------------------------------------------------------

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=1">'


def test_web_hostile_labels_and_log_lines_show_as_text_and_run_nothing(
    page: Any, serve: Serve
) -> None:
    ir = json.dumps(
        {
            "steps": [
                {"key": "evil", "label": XSS, "command": f"printf '%s\\n' '{XSS}' >&2; exit 1"},
            ]
        }
    )
    created = serve.build("hostile", ir, message=XSS, branch=XSS)
    serve.ended("hostile", created["number"])
    _sign_in(page, serve)
    for path in (
        "/local/pipelines/hostile",
        f"/local/pipelines/hostile/builds/{created['number']}?job=evil",
    ):
        page.goto(f"{serve.base}{path}")
        assert page.locator("img").count() == 0
        assert page.evaluate("window.__xss") is None
    page.locator("#log .line", has_text="<script>window.__xss=1</script>").wait_for()
    assert XSS in page.locator(".facts").inner_text()  # the branch and message, as text
    assert page.evaluate("window.__xss") is None


def test_web_pages_carry_a_policy_that_forbids_inline_script(page: Any, serve: Serve) -> None:
    _sign_in(page, serve)
    response = page.goto(f"{serve.base}/local/pipelines")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy


# --- logs: colours, groups, line links, a long log ---------------------------------------


def test_web_a_long_log_opens_at_its_tail_and_loads_earlier_output_on_demand(
    page: Any, serve: Serve
) -> None:
    # about 1.2 MB: more than the 128 KiB window the page opens with
    ir = "steps:\n  - {key: noisy, command: \"seq 1 200000 | sed 's/^/line /'\"}\n"
    created = serve.build("big", ir)
    serve.ended("big", created["number"])
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/big/builds/{created['number']}?job=noisy")
    page.locator("#log .line .text", has_text=re.compile(r"^line 200000$")).wait_for()
    assert page.locator("#log .line .text", has_text=re.compile(r"^line 1$")).count() == 0
    # not from its start: the page does not number lines it cannot count
    assert "unnumbered" in (page.locator("#log").get_attribute("class") or "")
    earlier = page.locator("#log-earlier")
    assert earlier.is_visible()
    shown = page.locator("#log .line").count()
    earlier.click()
    # more lines than before (a wait on the page's own DOM: no script of the test's runs
    # there, which the page's CSP would refuse)
    playwright_sync.expect(page.locator("#log .line").nth(shown)).to_be_attached(timeout=WAIT_MS)


def test_web_a_line_link_opens_the_log_at_that_line(page: Any, serve: Serve) -> None:
    ir = "steps:\n  - {key: counted, command: 'seq 1 50'}\n"
    created = serve.build("big", ir)
    serve.ended("big", created["number"])
    _sign_in(page, serve)
    page.goto(f"{serve.base}/local/pipelines/big/builds/{created['number']}?job=counted#L42")
    line = page.locator("#L42.target")
    line.wait_for()
    assert line.locator(".text").inner_text() == "42"
    assert line.locator("a.ln").get_attribute("href") == "#L42"
