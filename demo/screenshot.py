"""The README's screenshot of the demo: serve it locally, run one comparison in headless Chromium, save the page.

    python -m dit_sparse.demo.screenshot [--prompt P] [--steps 20] [--out docs/demo.png]

Needs Playwright for Python and Debian's Chromium (``apt-get install -y chromium``; no browser download). The
browser test (tests/demo/test_demo_browser.py) drives the page the same way with few steps and checks the numbers.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIDEOS_READY = ("() => ['#dense-video', '#sparse-video', '#side-by-side'].every(id => {"
                "  const v = document.querySelector(id + ' video');"
                " return v && v.readyState >= 2 && v.videoWidth > 0; })")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take(out: Path, prompt: str, steps: int, timeout_s: float = 600.0) -> float:
    """Serve the demo, run `prompt` at `steps` steps in the page, save a full-page screenshot; returns seconds."""
    from playwright.sync_api import sync_playwright

    from .app import build_app, launch_app

    app = build_app()
    port = free_port()
    launch_app(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    start = time.perf_counter()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1400, "height": 1700}).new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#plan-picture img")
            page.locator("#prompt textarea").fill(prompt)
            box = page.locator("#steps input[type=number]")
            box.fill(str(steps))
            box.press("Enter")
            page.locator("#run").click()
            page.wait_for_function(VIDEOS_READY)
            page.wait_for_selector("#heatmap img")
            page.locator("#metrics").scroll_into_view_if_needed()
            page.wait_for_timeout(1000)  # let the autoplaying clips show a frame
            page.evaluate("() => window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        app.close()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a blue square moving up on a light background")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="docs/demo.png")
    a = ap.parse_args(argv)
    seconds = take(Path(a.out), a.prompt, a.steps)
    print(f"wrote {a.out} ({a.steps} steps, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
