"""The built site in a real browser (headless Chromium driven by Playwright).

Chromium comes from Debian (`.ci/run` installs it); Playwright's own browser download is not
used. MathJax normally loads from a CDN: requests for it are answered from the copy shipped by
the `django-static-mathjax` package, so math renders offline exactly as it would online. Every
other external request is blocked; console errors from our own pages fail the test.
"""

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian package `chromium`, installed by .ci/run)"
)
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "_build" / "screenshots"


def local_mathjax() -> Path:
    mathjax = pytest.importorskip("mathjax", reason="django-static-mathjax is not installed")
    return Path(mathjax.__file__).parent / "static" / "mathjax"


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, html: Path):
    """Open a built page; return (page, console errors and page errors from our own files)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on(
        "console",
        lambda msg: (
            errors.append(f"{msg.text} @ {msg.location.get('url')}")
            if msg.type == "error" and str(msg.location.get("url", "")).startswith("file:")
            else None
        ),
    )
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

    mathjax_root = local_mathjax()

    def route(request_route):
        url = request_route.request.url
        if url.startswith(MATHJAX_CDN):
            local = mathjax_root / url[len(MATHJAX_CDN) :].split("?")[0]
            if local.is_file():
                return request_route.fulfill(path=str(local))
        if url.startswith(("http://", "https://")):
            return request_route.abort()
        return request_route.continue_()

    page.route("**/*", route)
    page.goto(html.as_uri(), wait_until="load")
    return page, errors


def test_intro_page_renders(built_site, browser):
    page, errors = open_page(browser, built_site.html / "intro.html")
    assert "Transformers and Large Language Models" in page.title()
    assert page.locator("nav").count() > 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "intro.png"))
    assert not errors, errors


def test_chapter_one_has_figures_math_and_launch_buttons(built_site, browser):
    page, errors = open_page(browser, built_site.html / "chapters" / "01_attention.html")
    page.wait_for_selector("mjx-container", state="attached", timeout=20_000)
    assert page.locator("mjx-container").count() >= 5, "math was not rendered by MathJax"

    figures = page.locator(".cell_output img")
    assert figures.count() >= 5, "expected the chapter's figures in the cell outputs"
    loaded = page.evaluate(
        "() => [...document.querySelectorAll('.cell_output img')].every(i => i.naturalWidth > 0)"
    )
    assert loaded, "some figure images did not load"

    launch_links = page.evaluate(
        "() => [...document.querySelectorAll('a')].map(a => a.href)"
        ".filter(h => h.includes('colab.research.google.com') || h.includes('mybinder.org'))"
    )
    assert any("colab" in h for h in launch_links) and any("mybinder" in h for h in launch_links)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chapter01.png"), full_page=False)
    assert not errors, errors
