"""The web dashboard at ``/``: its files over real HTTP, and the page itself in headless Chromium
(Playwright) against a real ``modelium serve`` with a real tiny model: the models table, the
device bars, a load seen live over ``/ws/events`` without a reload, the page's fallbacks when
the event stream is out of reach, and the API key it asks for when the server has keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import copy_model
from playwright.sync_api import Page, expect, sync_playwright

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                    reason="no Chromium executable on this machine (apt-get install chromium)")
WAIT_MS = 60_000  # a deadline to wait for the page, not a timing assertion


@pytest.fixture
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url: str) -> tuple[Page, list[str]]:
    """A fresh page at ``url``; the list collects the page's uncaught JavaScript errors."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("MODELIUM_ARTIFACTS"):
        dest = Path(os.environ["MODELIUM_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, dest / name))
    print(f"dashboard screenshot: {shot}")
    return shot


def test_the_page_and_its_files_are_served_without_shadowing_the_api(make_server):
    server = make_server().start()
    page = server.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/static/app.js">' in page.text
    for name, mime in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = server.get(f"/dashboard/static/{name}")
        assert r.status_code == 200 and mime in r.headers["content-type"], (name, r.headers)
        assert r.content == (Path(__file__).parents[1] / "modelium/api/static" / name).read_bytes()
    missing = server.get("/dashboard/static/nope.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    escape = server.get("/dashboard/static/..%2F..%2Fapp.py")
    assert escape.status_code == 404
    # the JSON routes the page reads are still the API's
    assert server.get("/health").json()["status"] == "ok"
    assert server.get("/models").json() == {"models": []}
    assert "devices" in server.get("/status").json()


@needs_chromium
def test_the_dashboard_shows_models_devices_loads_and_evictions_live(make_server, tiny_llama, tiny_gpt2, tmp_path,
                                                                      browser):
    # memory for one tiny model (~385 MiB each): loading the second evicts the first
    server = make_server(args=["--cpu-memory", "984MiB"]).start()  # 600 MiB after its spare worker (384)
    copy_model(tiny_llama, server.models, "alpha")
    copy_model(tiny_gpt2, server.models, "beta")
    server.wait_model("alpha")
    server.wait_model("beta")

    page, errors = open_page(browser, server.url + "/")
    row = page.locator('#models tbody tr[data-model="alpha"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row.locator("td.name")).to_have_text("alpha")
    assert row.get_attribute("data-state") in ("discovered", "unloaded")
    expect(page.locator("#stream-status")).to_have_text("live", timeout=WAIT_MS)
    # one bar per device the server has, with its budget
    devices = server.get("/status").json()["devices"]
    for name in devices:
        dev = page.locator(f'#devices .device[data-device="{name}"]')
        expect(dev).to_be_visible()
        expect(dev.locator(".facts")).to_contain_text("of budget")
    # the stream began with the log's history: the model's discovery is there, no load yet
    expect(page.locator('#events li[data-type="ModelDiscovered"][data-model="alpha"]')).to_have_count(1)
    assert page.locator('#events li[data-type="LoadStarted"]').count() == 0
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "alpha", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text

    for kind in ("LoadStarted", "LoadCompleted"):
        expect(page.locator(f'#events li[data-type="{kind}"][data-model="alpha"]')).to_have_count(1, timeout=WAIT_MS)
        expect(page.locator(f'#timeline-list li[data-type="{kind}"][data-model="alpha"]')).to_have_count(1)
    expect(page.locator('#timeline .lane[data-model="alpha"] .seg.resident')).to_have_count(1)
    expect(row).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
    model = server.get("/models/alpha").json()
    expect(row.locator("td").nth(2)).to_have_text(model["device"])
    expect(page.locator('#events li[data-type="RequestArrived"][data-model="alpha"]')).to_have_count(1)
    expect(row.locator("td").nth(6)).not_to_have_text("never", timeout=WAIT_MS)  # last use

    # the second model: alpha is evicted to make room, all of it seen without a reload
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "beta", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    expect(page.locator('#timeline-list li[data-type="LoadCompleted"][data-model="beta"]')).to_have_count(
        1, timeout=WAIT_MS)
    expect(page.locator('#timeline-list li[data-type="Evict"][data-model="alpha"]')).to_have_count(1)
    expect(page.locator('#timeline-list li[data-type="Evict"][data-model="alpha"]')).to_contain_text("making room")
    expect(page.locator('#timeline-list li[data-type="Unloaded"][data-model="alpha"]')).to_have_count(
        1, timeout=WAIT_MS)
    expect(page.locator('#timeline .lane[data-model="alpha"] .mark.evict')).to_have_count(1)
    expect(row).to_have_attribute("data-state", "unloaded", timeout=WAIT_MS)
    expect(page.locator('#models tbody tr[data-model="beta"]')).to_have_attribute("data-state", "ready",
                                                                                   timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True
    assert errors == []
    save_screenshot(page, tmp_path, "dashboard.png")


@needs_chromium
def test_without_the_event_stream_the_page_says_so_and_falls_back(make_server, tmp_path, browser):
    server = make_server().start()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a server without /ws/events: the page's WebSocket goes to a path the server does not have
    page.add_init_script("""(() => {
        const Real = window.WebSocket;
        window.WebSocket = function (url, protocols) {
            return new Real(String(url).replace("/ws/events", "/ws/no-such-route"), protocols);
        };
        Object.assign(window.WebSocket, Real);
    })()""")
    # ... nor GET /events: the page says the stream is unavailable
    page.route("**/events?*", lambda route: route.fulfill(status=404, body="not here"))
    page.goto(server.url + "/")
    expect(page.locator("#stream-status")).to_have_text("live stream unavailable", timeout=WAIT_MS)
    expect(page.locator("#models-empty")).to_be_visible(timeout=WAIT_MS)  # the rest still works
    save_screenshot(page, tmp_path, "dashboard-no-stream.png")
    # with GET /events, the page polls it and still shows new events
    page.unroute("**/events?*")
    page.reload()
    expect(page.locator("#stream-status")).to_have_text("live stream unavailable · polling", timeout=WAIT_MS)
    broken = server.models / "beta"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")  # an invalid model: an event, no load
    expect(page.locator('#events li[data-type="ModelInvalid"][data-model="beta"]')).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator('#models tbody tr[data-model="beta"]')).to_have_attribute("data-state", "invalid",
                                                                                   timeout=WAIT_MS)
    assert errors == []


@needs_chromium
def test_with_api_keys_the_page_asks_for_one_and_keeps_it(make_server, tmp_path, browser):
    server = make_server()
    made = subprocess.run([sys.executable, "-m", "modelium", "keys", "create", "--tenant", "acme", "--role", "admin",
                           "--db", str(server.db), "--json"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    server.start()
    assert server.get("/").status_code == 200  # the page itself needs no key
    assert server.get("/models").status_code == 401

    page, errors = open_page(browser, server.url + "/")
    expect(page.locator("#notice")).to_contain_text("needs an API key", timeout=WAIT_MS)
    expect(page.locator("#stream-status")).to_have_text("live stream unavailable", timeout=WAIT_MS)
    page.fill("#api-key", key)
    page.click("#key-form button")
    expect(page.locator("#stream-status")).to_have_text("live", timeout=WAIT_MS)  # ?api_key= on the WebSocket
    expect(page.locator("#notice")).to_be_hidden(timeout=WAIT_MS)  # Bearer on the fetches
    expect(page.locator("#models-empty")).to_be_visible()
    expect(page.locator('#events li[data-type="ServerStarted"]')).to_have_count(1)
    assert page.evaluate("localStorage.getItem('modelium.apiKey')") == key
    page.reload()  # the key is remembered
    expect(page.locator("#stream-status")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#notice")).to_be_hidden(timeout=WAIT_MS)
    assert errors == []
