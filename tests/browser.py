"""Headless Chromium for tests (and scripts/report_screenshot.py): open a page, collect its
console errors, count its charts, take a screenshot.

Uses the distribution's Chromium (/usr/bin/chromium, or $FEDLORA_CHROMIUM) through Playwright's
Python driver; Playwright's own browser download is never used. The flags turn off Chromium's
background connections, which a closed network would refuse at every start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FLAGS = ["--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--disable-default-apps"]


def chromium_path() -> str | None:
    return os.environ.get("FEDLORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def open_report(page_path: Path, screenshot: Path | None = None, width: int = 1200,
                height: int | None = None) -> dict:
    """Open `page_path` (file://) and return {'errors', 'requests', 'svg', 'img', 'broken_img', 'title'}.

    errors: console messages of type error and uncaught page errors. requests: every URL the page
    asked for other than itself and data: URIs (a self-contained page asks for none).
    """
    from playwright.sync_api import sync_playwright

    url = page_path.resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height or 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if r.url != url and not r.url.startswith("data:")
                    else None)
            page.goto(url, wait_until="load")
            broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth == 0)"
                                   ".length")
            info = {"errors": errors, "requests": requests, "svg": page.locator("figure svg").count(),
                    "img": page.locator("figure img").count(), "broken_img": broken, "title": page.title()}
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=height is None)
            return info
        finally:
            browser.close()
