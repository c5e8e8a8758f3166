"""The console in a real headless Chromium against the real demo system (`edgefleet demo`: the
fleet service, its embedded broker, three agents under traffic).

An operator signs in, starts a staged rollout, reads the gate values, approves the next wave,
aborts by keyboard and sees the devices go back; a viewer sees but cannot act; an admin makes
and revokes a token. What each page shows is checked against what the API returns. Every page
is checked for labels, contrast and sideways scrolling at desktop and tablet width, and
screenshots go to artifacts/console/.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.console.browser import DESKTOP, TABLET, accessibility_problems, screenshot
from tests.console.conftest import DemoStack
from tests.e2e.system import wait_until

pytestmark = pytest.mark.slow

RATES = {"error_rate", "fallback_rate", "failed_installs", "outcome_success_rate"}
OpenPage = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, demo_stack: DemoStack) -> Iterator[OpenPage]:
    """Pages signed in with a token of the given role; no page may raise a script error."""
    contexts = []
    errors: list[str] = []

    def open_page(role: str = "admin", viewport: dict[str, int] = DESKTOP) -> Page:
        context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.set_default_timeout(20_000)
        token = demo_stack.token(f"console-{role}-{len(contexts)}-{id(page)}", role)
        sign_in(page, demo_stack, token)
        expect(page.locator("#session")).to_contain_text(role)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == []


def sign_in(page: Page, stack: DemoStack, token: str) -> None:
    page.goto(f"{stack.url}/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def go(page: Page, stack: DemoStack, where: str) -> None:
    page.goto(f"{stack.url}/console/#{where}")
    expect(page.locator("#live")).to_contain_text("Live")


def table_rows(page: Page, selector: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.locator("td").all_inner_texts()]
        for row in page.locator(f"{selector} tbody tr").all()
    ]


def shown_number(text: str) -> float | None:
    """A gate value as the console shows it, back as the API's number."""
    if text == "—":
        return None
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text.replace(",", ""))


def running(stack: DemoStack, device: str) -> str | None:
    detail = stack.api.get(f"/devices/{device}").json()
    versions = [m["version"] for m in detail["models"] if m["name"] == stack.info["model"]]
    return versions[0] if versions else None


def test_a_bad_token_is_refused_with_the_apis_own_message(
    browser: Browser, demo_stack: DemoStack
) -> None:
    page = browser.new_page(viewport=DESKTOP)  # type: ignore[arg-type]
    sign_in(page, demo_stack, "efa_not-a-real-token")
    refused = demo_stack.api.get("/me", headers={"Authorization": "Bearer efa_not-a-real-token"})
    assert refused.status_code == 401
    expect(page.get_by_role("alert").first).to_have_text(refused.json()["error"])
    expect(page.locator("#nav")).to_be_hidden()
    page.close()


def test_the_devices_page_shows_what_the_api_returns_and_filters_by_group(
    open_page: OpenPage, demo_stack: DemoStack
) -> None:
    page = open_page("viewer")
    go(page, demo_stack, "/devices")
    devices = demo_stack.api.get("/devices").json()
    expect(page.locator("#devices tbody tr")).to_have_count(len(devices))
    rows = {row[0]: row for row in table_rows(page, "#devices")}
    assert set(rows) == {d["id"] for d in devices} == set(demo_stack.info["agents"])
    for device in devices:
        row = rows[device["id"]]
        assert row[1] == device["health"].replace("_", " ")
        for model in device["models"]:
            assert f"{model['name']} {model['version']}" in row[2]
            assert model["device"] in row[3]
        assert row[5].split() == list(device["groups"])

    group, members = next((g, m) for g, m in demo_stack.info["groups"].items() if len(m) > 1)
    page.get_by_label("Group", exact=True).select_option(group)
    expect(page).to_have_url(re.compile(f"group={group}"))
    expect(page.locator("#devices tbody tr")).to_have_count(len(members))
    in_group = demo_stack.api.get("/devices", params={"group": group}).json()
    assert [row[0] for row in table_rows(page, "#devices")] == [d["id"] for d in in_group]
    screenshot(page, "devices-filtered-by-group")


@pytest.mark.timeout(400)
def test_an_operator_runs_a_staged_rollout_approves_aborts_and_the_devices_go_back(
    open_page: OpenPage, demo_stack: DemoStack
) -> None:
    model = demo_stack.info["model"]
    group, members = next((g, m) for g, m in demo_stack.info["groups"].items() if len(m) > 1)
    before = {device: running(demo_stack, device) for device in members}
    page = open_page("operator")
    operator = page.locator("#session .who").inner_text().split()[0]

    go(page, demo_stack, "/rollouts")
    page.get_by_role("link", name="Start a rollout…").click()
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Version", exact=True).select_option("2.1.0")
    page.get_by_label(re.compile(f"^ ?{group} \\(")).check()
    page.get_by_label("Waves (cumulative percent)").fill("50,100")
    page.get_by_label("Soak (seconds)").fill("3")
    page.get_by_label("Approval", exact=True).select_option("manual")
    page.get_by_text("Gate thresholds").click()
    page.get_by_label("Requests before rate gates judge").fill("20")
    # Latency on two shared cores is noise at this traffic; the flow, not the verdict, is tested.
    page.get_by_label("Max p95 latency ratio").fill("10")
    page.get_by_role("button", name="Start rollout").click()

    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Rollout r-"))
    rollout_id = page.get_by_role("heading", level=1).inner_text().split()[-1]

    def rollout() -> dict[str, Any]:
        return dict(demo_stack.api.get(f"/rollouts/{rollout_id}").json())

    wait_until(lambda: rollout()["state"] == "awaiting_approval", "wave 1 to pass", 150, rollout)
    approve = page.get_by_role("button", name="Approve next wave")
    expect(approve).to_be_visible()
    screenshot(page, "rollout-awaiting-approval")

    # The gates of the first wave, as shown, are the API's values against its thresholds.
    view = rollout()
    assert view["state"] == "awaiting_approval" and view["created_by"] == operator
    gates = view["waves"][0]["gates"]
    assert gates, view
    shown = table_rows(page, '#waves article[aria-label="Wave 1"]')
    assert len(shown) == len(gates)
    for gate, row in zip(gates, shown, strict=True):
        assert row[0] == gate["name"].replace("_", " ")
        for text, value in ((row[1], gate["value"]), (row[2], gate["threshold"])):
            if value is None:
                assert text == "—"
            else:
                # Shown rounded: rates to 0.01 percentage points, others to 3 significant digits.
                assert shown_number(text) == pytest.approx(value, rel=5e-3, abs=5e-5)
        assert row[4] == {True: "passed", False: "failed", None: "insufficient"}[gate["passed"]]
        assert int(row[5].replace(",", "")) == gate["samples"]

    approve.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Reason (kept in the audit log)").fill("canary looks fine")
    dialog.get_by_role("button", name="Approve").click()

    wait_until(
        lambda: {a["status"] for a in rollout()["devices"]} == {"committed"},
        "both waves' devices to commit 2.1.0",
        explain=rollout,
    )
    for device in members:
        expect(page.locator("#rollout-devices tbody tr").filter(has_text=device)).to_contain_text(
            "committed"
        )

    # Abort with the keyboard alone: the button, the reason, then Tab to the confirmation.
    abort = page.get_by_role("button", name="Abort and roll back")
    abort.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog")).to_be_visible()
    page.keyboard.type("stop: checking the store cameras")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")

    devices = page.locator("#rollout-devices tbody tr")
    for device in members:
        expect(devices.filter(has_text=device)).to_contain_text("rolled back", timeout=120_000)
    wait_until(
        lambda: all(running(demo_stack, d) == before[d] for d in members),
        f"{members} to run {before} again",
    )
    expect(page.locator(".badge").filter(has_text="aborted").first).to_be_visible()
    # The progress bar shows the rolled-back devices (drawn through the CSSOM under the CSP).
    bar = page.locator(".progress span.bad").first.bounding_box()
    assert bar is not None and bar["width"] > 10
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text(f"approved by {operator}: canary looks fine")
    expect(timeline).to_contain_text(f"aborted by {operator}: stop: checking the store cameras")
    screenshot(page, "rollout-aborted")

    # The devices page agrees: they run what they ran before.
    go(page, demo_stack, f"/devices?group={group}")
    for device in members:
        listed = page.locator("#devices tbody tr").filter(has_text=device)
        expect(listed).to_contain_text(f"{model} {before[device]}")
    screenshot(page, "devices-after-abort")

    # The audit log shows the operator's commands, newest first, as the API lists them.
    go(page, demo_stack, f"/audit?subject={rollout_id}")
    entries = demo_stack.api.get("/audit", params={"subject": rollout_id, "limit": 50}).json()
    expect(page.locator("#audit tbody tr")).to_have_count(len(entries))
    actions = [row[2] for row in table_rows(page, "#audit")]
    assert actions == [e["action"] for e in entries]
    assert {"rollout.approved", "rollout.aborted"} <= set(actions)
    screenshot(page, "audit-log")


def test_a_viewer_sees_rollouts_but_has_no_commands(
    open_page: OpenPage, demo_stack: DemoStack
) -> None:
    page = open_page("viewer")
    expect(page.get_by_role("link", name="Tokens")).to_be_hidden()
    go(page, demo_stack, "/rollouts")
    expect(page.get_by_role("link", name="Start a rollout…")).to_have_count(0)
    rollouts = demo_stack.api.get("/rollouts").json()
    assert rollouts, "the operator test leaves a rollout behind"
    expect(page.locator("#rollouts tbody tr")).to_have_count(len(rollouts))
    go(page, demo_stack, f"/rollouts/{rollouts[-1]['id']}")
    expect(page.locator("#commands")).to_contain_text("Operators can")
    expect(page.locator("#commands button")).to_have_count(0)
    go(page, demo_stack, "/rollouts/new")
    expect(page.get_by_role("main")).to_contain_text("needs an operator or admin token")
    go(page, demo_stack, "/tokens")
    expect(page.get_by_role("main")).to_contain_text("needs an admin token")


def test_an_admin_makes_a_token_sees_its_secret_once_and_revokes_it(
    open_page: OpenPage, demo_stack: DemoStack
) -> None:
    page = open_page("admin")
    go(page, demo_stack, "/tokens")
    page.get_by_label("Name (who or what uses it)").fill("grafana-reader")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Make token").click()
    secret = page.locator("#new-secret").inner_text()
    assert secret.startswith("efa_")
    me = demo_stack.api.get("/me", headers={"Authorization": f"Bearer {secret}"}).json()
    assert (me["name"], me["role"]) == ("grafana-reader", "viewer")
    row = page.locator("#tokens tbody tr").filter(has_text="grafana-reader")
    expect(row).to_contain_text(me["id"])
    row.get_by_role("button", name="Revoke grafana-reader").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    expect(page.locator("#tokens tbody tr").filter(has_text="grafana-reader")).to_have_count(0)
    refused = demo_stack.api.get("/me", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401


def test_keyboard_alone_reaches_the_content_and_the_pages(
    open_page: OpenPage, demo_stack: DemoStack
) -> None:
    page = open_page("viewer")
    go(page, demo_stack, "/")
    page.reload()  # a fresh load: the keyboard starts at the top
    expect(page.locator("#cards .card").first).to_be_visible()
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_visible()  # shown when focused
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()
    expect(page.get_by_role("heading", level=1)).to_have_text("Fleet overview")
    page.reload()
    expect(page.locator("#cards .card").first).to_be_visible()
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Devices":
            break
    expect(page.get_by_role("link", name="Devices", exact=True)).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Devices")
    expect(page.get_by_role("heading", level=1)).to_be_focused()
    expect(page.get_by_role("link", name="Devices", exact=True)).to_have_attribute(
        "aria-current", "page"
    )


PAGES = ["/", "/devices", "/models", "/rollouts", "/rollouts/new", "/audit", "/tokens"]


@pytest.mark.parametrize("viewport", [DESKTOP, TABLET], ids=["1280x800", "tablet-768"])
def test_every_page_is_labelled_readable_and_fits_the_screen(
    open_page: OpenPage, demo_stack: DemoStack, viewport: dict[str, int]
) -> None:
    page = open_page("admin", viewport)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    model = demo_stack.info["model"]
    rollouts = demo_stack.api.get("/rollouts").json()
    pages = [*PAGES, f"/models/{model}/2.1.0", f"/devices/{next(iter(demo_stack.info['agents']))}"]
    pages += [f"/rollouts/{r['id']}" for r in rollouts[-1:]]
    size = f"{viewport['width']}x{viewport['height']}"
    for where in pages:
        go(page, demo_stack, where)
        page.wait_for_load_state("networkidle")
        problems: dict[str, Any] = accessibility_problems(page)
        assert problems == {}, where
        name = where.strip("/").replace("/", "-") or "overview"
        screenshot(page, f"{size}-{name}")
    # Everything the console loaded came from the fleet service itself.
    assert requested and all(url.startswith(demo_stack.url) for url in requested)


def test_the_page_checks_do_catch_what_they_look_for(browser: Browser) -> None:
    page = browser.new_page(viewport=TABLET)  # type: ignore[arg-type]
    page.set_content(
        '<p style="color:#aaa;background:#fff">pale text</p>'
        '<input name="unlabelled"><button></button><svg width="10" height="10"></svg>'
        '<div style="width:2000px">wide</div>'
    )
    problems = accessibility_problems(page)
    assert [p.split(":")[0] for p in problems["low contrast"]] == ['P "pale text"']
    assert len(problems["no accessible name"]) == 3  # the input, the button and the svg
    assert problems["scrolls sideways by px"] > 1000
    page.close()
