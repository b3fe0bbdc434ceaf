"""Every page of the built site, offline, in a real browser (headless Chromium via Playwright).

Each page is opened with every non-local request blocked and nothing patched in: the site has
to serve what it needs itself (MathJax, RequireJS, the ipywidgets manager: see
`_ext/offline_assets.py`). On every page: no failed request, no console error, every image
loaded, every math element typeset by MathJax, every widget stored in the notebook rendered,
one visible search field (the search page's own query form aside); a screenshot goes to
`_build/screenshots/`. Chromium comes from Debian (`.ci/run` installs it); Playwright's own
browser download is not used.
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, toc_files

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian package `chromium`, installed by .ci/run)"
)
PAGES = ["intro", *toc_files(), "genindex", "search"]
SCREENSHOTS = ROOT / "_build" / "screenshots"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# Text that MathJax left as LaTeX: a text node outside code and outside MathJax's own output.
RAW_MATH_JS = r"""() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const skip = node.parentElement.closest("pre, code, script, style, mjx-container, textarea");
    if (!skip && /\\\(|\\\[|\$\$/.test(node.textContent)) raw.push(node.textContent.slice(0, 80));
  }
  return raw;
}"""
PAGE_STATE_JS = """() => ({
  math: document.querySelectorAll(".math").length,
  untypeset: [...document.querySelectorAll(".math")]
    .filter((e) => !e.querySelector("mjx-container")).map((e) => e.textContent.slice(0, 80)),
  unloaded: [...document.images].filter((i) => !i.complete || i.naturalWidth === 0)
    .map((i) => i.getAttribute("src")),
  images: document.images.length,
  widgetState: document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-state+json"]').length,
  searchFields: [...document.querySelectorAll(".search-button-field, form.bd-search")]
    .filter((e) => e.offsetParent !== null && !e.closest(".bd-search-container")).length,
})"""
# Views the manager drew: it puts each one in a .widget-subarea just before the view's script.
RENDERED_WIDGETS_JS = """() => [...document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]')].filter((s) => {
  const area = s.previousElementSibling;
  return area && area.matches(".widget-subarea") && area.querySelector(".jupyter-widgets")
    && area.getBoundingClientRect().height > 0;
}).length"""


def stored_widget_views(name: str) -> int:
    """How many widget views the page's notebook stores (0 for Markdown pages)."""
    notebook = ROOT / f"{name}.ipynb"
    if not notebook.is_file():
        return 0
    cells = json.loads(notebook.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    return sum(WIDGET_VIEW in o.get("data", {}) for o in outputs)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_offline(browser, html: Path):
    """Open a built page with non-local requests blocked; return (page, problems seen)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else 0)
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})"))

    def route(request_route):
        if request_route.request.url.startswith("file:"):
            return request_route.continue_()
        return request_route.abort()  # reported by `requestfailed`

    page.route("**/*", route)
    page.goto(html.as_uri(), wait_until="load")
    return page, problems


def wait_until_settled(page, widget_views: int) -> None:
    """Let MathJax typeset, the widget manager draw and every image finish loading."""
    page.evaluate("() => window.MathJax?.startup?.promise")
    if widget_views:
        page.wait_for_function(f"({RENDERED_WIDGETS_JS})() >= {widget_views}", timeout=20_000)
    page.wait_for_function("() => [...document.images].every((i) => i.complete)")


def test_every_built_page_is_checked(built_site):
    built = {
        str(p.relative_to(built_site.html).with_suffix(""))
        for p in built_site.html.rglob("*.html")
        if "_static" not in p.parts
    }
    assert built - {"index"} == set(PAGES)
    assert 'url=intro.html"' in (built_site.html / "index.html").read_text(), "index redirects"


@pytest.mark.parametrize("name", PAGES)
def test_page_works_offline(built_site, browser, name):
    widget_views = stored_widget_views(name)
    page, problems = open_offline(browser, built_site.html / f"{name}.html")
    try:
        wait_until_settled(page, widget_views)
    except playwright_api.TimeoutError as exc:
        problems.append(f"not settled: {exc}")
    state = page.evaluate(PAGE_STATE_JS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name.replace('/', '_')}.png"))

    assert not problems, problems
    assert not state["unloaded"], f"images not loaded: {state['unloaded']}"
    assert not state["untypeset"], f"math not typeset by MathJax: {state['untypeset']}"
    assert not page.evaluate(RAW_MATH_JS), "raw LaTeX left on the page"
    assert page.evaluate(RENDERED_WIDGETS_JS) == widget_views, "stored widgets not all rendered"
    assert state["widgetState"] == (1 if widget_views else 0)
    assert state["searchFields"] == 1, f"{state['searchFields']} visible search fields"
    page.close()


def test_chapters_have_math_figures_and_widgets(built_site, browser):
    """The checks above bite: chapter 1 has math, figures and a widget to check."""
    page, _ = open_offline(browser, built_site.html / "chapters" / "01_attention.html")
    wait_until_settled(page, 1)
    state = page.evaluate(PAGE_STATE_JS)
    assert state["math"] >= 20 and state["images"] >= 5 and state["widgetState"] == 1
    assert page.locator("mjx-container").count() >= state["math"]
    page.close()
