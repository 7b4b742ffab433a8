"""Serve the dashboard with `forge ui` and drive it with Playwright in Debian's chromium (Playwright's own
browser download does not work here). Used by test_browser.py; also runnable by hand to look at a run root:
python tests/ui/_browser.py RUN_ROOT OUT_DIR."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(run_root: Path, log_path: Path):
    """`forge ui --run-root run_root --port <free>` until the block ends; yields the base URL."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "forge.cli", "ui", "--run-root", str(run_root),
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"forge ui exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"forge ui did not answer within {seconds} s: {log_path.read_text()[-2000:]}")


@contextmanager
def browser_page(profile: Path):
    """A chromium page (1400 px wide) and the list its console errors and page errors go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            yield page, errors
        finally:
            context.close()


def open_page(page, label: str, timeout_ms: int = 60_000) -> None:
    """Click a page in the sidebar and wait until it is drawn (its title shows, the app is idle)."""
    page.locator('[data-testid="stSidebar"]').get_by_text(label, exact=True).click()
    page.locator("h1", has_text=label).first.wait_for(timeout=timeout_ms)
    wait_idle(page, timeout_ms)


IDLE = """() => !document.querySelector('[data-testid="stStatusWidget"]')
             && !document.querySelector('[data-stale="true"]')"""


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Until the app has been idle (no running indicator, no stale element) for a second in a row."""
    calm, waited = 0, 0
    while calm < 3:
        if waited > timeout_ms:
            raise TimeoutError(f"the app was still running after {timeout_ms} ms")
        calm = calm + 1 if page.evaluate(IDLE) else 0
        page.wait_for_timeout(250)
        waited += 250


def screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main element, so the window is made as tall as that."""
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(max(int(height), 1000), 12000)})
    page.wait_for_timeout(600)          # plotly redraws at the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def visit_all(run_root: Path, out_dir: Path, pages: list[str]) -> dict:
    """Visit every page, screenshot each into out_dir; returns {page: (text, plot count)} and console errors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = {}
    with served(run_root, out_dir / "server.log") as url, browser_page(out_dir / "profile") as (page, errors):
        page.goto(url)
        page.locator("h1", has_text="Pipeline overview").first.wait_for(timeout=90_000)
        wait_idle(page)
        for label in pages:
            open_page(page, label)
            screenshot(page, out_dir / f"{slug(label)}.png")
            main = page.locator('[data-testid="stMain"]')
            seen[label] = (main.inner_text(), page.locator(".js-plotly-plot").count())
    return {"pages": seen, "errors": errors}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from forge.ui.app import PAGES

    report = visit_all(Path(sys.argv[1]), Path(sys.argv[2]), PAGES)
    for name, (text, plots) in report["pages"].items():
        print(f"{name}: {plots} plots, {len(text)} characters")
    print("console errors:", report["errors"])
