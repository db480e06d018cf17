"""End to end: the demo served on a free localhost port, driven in headless Chromium (Debian's chromium with
Playwright for Python; no browser download) and through the API with gradio_client.

In CI (CI set) a missing browser or Playwright fails these tests; elsewhere they skip, saying why.
"""

import os
import time
from pathlib import Path

import pytest

from dit_sparse.demo.screenshot import CHROMIUM, CHROMIUM_ARGS, VIDEOS_READY, free_port

PROMPT = "a blue square moving up on a light background"
# prompt, seed, steps, guidance, resolution, frames, plan source, shipped plan, plan file, strategy, knob
API_INPUTS = [PROMPT, 0, 3, 4.5, "32x32", 4, "shipped plan", "tiny-shapes.plan.json", None, "diagonal", 0.25]
TIMEOUT_MS = 120_000


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def server():
    """The demo app (tiny-shapes) launched on 127.0.0.1 in this process; yields (app, url)."""
    from dit_sparse.demo.app import build_app, launch_app

    app = build_app()
    port = free_port()
    launch_app(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(server):
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    _, url = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1700})
        # nothing but the demo server: a request anywhere else would be a bug (fonts, trackers, CDNs)
        outside = []

        def route(r):
            if r.request.url.startswith(url) or r.request.url.startswith("data:") or r.request.url.startswith("blob:"):
                return r.continue_()
            outside.append(r.request.url)
            return r.abort()

        context.route("**/*", route)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(url)
        pg.wait_for_selector("#run")
        yield pg
        browser.close()
    assert outside == [], f"the page asked for outside resources: {outside}"


def _client(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


# the table's body rows by their ARIA roles (gradio draws them as div[role=row] > [role=gridcell])
SHOWN_ROWS = ("Array.from(document.querySelectorAll('#metrics [role=row]'))"
              ".map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))"
              ".filter(r => r.length)")


def _shown_table(page) -> list[list[str]]:
    return page.evaluate(f"() => {SHOWN_ROWS}")


def _api_table(value) -> list[list[str]]:
    return [[str(c) for c in row] for row in value["data"]]


def test_page_generates_and_shows_the_numbers_the_api_returns(server, page, tmp_path):
    from dit_sparse.demo.results import metrics_table

    app, url = server
    start = time.perf_counter()
    page.wait_for_selector("#plan-picture img")  # drawn on load, before anything is generated
    page.locator("#prompt textarea").fill(PROMPT)
    _set_number(page, "steps", 3)
    _set_number(page, "frames", 4)
    page.locator("#run").click()

    # both videos loaded and decodable by the browser, and the metrics table filled in
    page.wait_for_function(VIDEOS_READY)
    page.locator("#metrics").scroll_into_view_if_needed()  # the table renders only the rows in view
    page.wait_for_function(f"() => {SHOWN_ROWS}.length >= 11")
    page.wait_for_selector("#heatmap img")
    shown = _shown_table(page)
    assert [row[0] for row in shown][:3] == ["total time, dense (s)", "total time, sparse (s)", "speedup (total)"]
    assert len(shown) == 11 and all(len(row) == 2 for row in shown)
    status = page.locator("#status").inner_text()
    assert "Done in" in status

    # the numbers shown are the numbers returned: the API gives the same request's result (from the cache)
    result = _client(url, tmp_path).predict(*API_INPUTS, api_name="/compare")
    dense, sparse, side, heatmap, table, plan_png, raw, api_status = result
    assert "cache" in api_status
    assert _api_table(table) == shown
    raw = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in raw.items()}
    assert metrics_table(raw) == shown
    for path in (dense, sparse, side):
        assert Path(path["video"] if isinstance(path, dict) else path).stat().st_size > 0
    # ... and what the callback returns for it
    callback_raw = app.demo_callbacks.compare(*API_INPUTS)[6]
    assert metrics_table({k: float(v) if v == "inf" else v for k, v in callback_raw.items()}) == shown

    page.wait_for_timeout(700)  # let the autoplaying clips show a frame
    shot = tmp_path / "demo.png"  # the README's screenshot comes from `python -m dit_sparse.demo.screenshot`
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert time.perf_counter() - start < 90


def _toast(page, text):
    page.get_by_text(text).first.wait_for(state="visible", timeout=30_000)


def test_bad_input_shows_a_message_on_the_page(server, page, tmp_path):
    app, _ = server
    runs = app.demo_backend.runs
    page.locator("#prompt textarea").fill("   ")
    page.locator("#run").click()
    _toast(page, "the prompt is empty")

    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#resolution input").fill("33x33")
    page.locator("#resolution input").press("Enter")
    page.locator("#run").click()
    _toast(page, "this model cannot take 33x33")

    broken = tmp_path / "broken.plan.json"
    broken.write_text('{"format": "dit-sparse-plan", ')
    page.get_by_label("upload a plan").check()
    page.locator("#plan-file input[type=file]").set_input_files(str(broken))
    _toast(page, "is not valid JSON")
    assert app.demo_backend.runs == runs
    # the queue is not stuck: the page still answers
    page.get_by_label("shipped plan").check()
    page.locator("#resolution input").fill("32x32")
    page.locator("#resolution input").press("Enter")
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('cache')")


def test_two_visitors_at_once_both_get_their_results(server, tmp_path):
    """Two API clients submit at the same moment: the second queues, both complete with their own results."""
    app, url = server
    requests = [[PROMPT, 41, *API_INPUTS[2:]], ["a green triangle shrinking on a dark background", 42, *API_INPUTS[2:]]]
    clients = [_client(url, tmp_path / str(i)) for i in range(2)]
    jobs = [c.submit(*req, api_name="/compare") for c, req in zip(clients, requests)]
    results = [job.result(timeout=120) for job in jobs]
    for req, result in zip(requests, results):
        assert "Done in" in result[7]  # each ran (neither was the other's cached result)
        assert result[6] == app.demo_callbacks.compare(*req)[6]  # the result of that very request
    assert results[0][6]["psnr"] != results[1][6]["psnr"]
